"""Two models busy at once on one CPU machine: OpenBLAS threads fixed vs chosen from what runs.

    python -m benchmarks.lab.bench_cpu_threads                 # SmolLM2 + Gemma, 5 requests each
    python -m benchmarks.lab.bench_cpu_threads --seconds 60 --rounds 2
    python -m benchmarks.lab.bench_cpu_threads --serve         # the same through `serve run`

Each model runs in its own process (as each model replica does under `serve run`), with its own
engine on the CPU fast path. Both warm up, then decode waves of `--batch` requests (32 tokens,
EOS ignored) for `--seconds`, starting at the same moment. Modes, in turn: `fixed` (OpenBLAS
keeps the threads it started with: every core, `engine.adaptive_cpu_threads: false`) and
`adaptive` (the default: engine/cpu_threads.py). Then each model alone, adaptive, for what a
model that has the machine to itself makes. With `--serve`, the same A/B through `serve run` of
serve_config.yaml (a copy with `adaptive_cpu_threads` set for both models): `--batch` streaming
clients per model over HTTP, both models at once. Prints one JSON document and a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request

from ..report import emit

MODELS = ["smollm2-135m-instruct", "gemma-3-270m"]
TOKENS = 32


def worker(source: str, batch: int, seconds: float, start_at: float, adaptive: bool) -> dict:
    from engine.config import EngineConfig
    from engine.engine import AsyncEngine

    from ..bench_engine import prompt_ids, run_engine

    engine = AsyncEngine.from_source(
        source, EngineConfig(max_num_seqs=16, paged_cache=True, adaptive_cpu_threads=adaptive)
    )
    prompts = prompt_ids(engine.tokenizer, batch)

    async def waves() -> dict:
        await run_engine(engine, prompts, TOKENS)  # warm-up: this batch's shapes
        await asyncio.sleep(max(0.0, start_at - time.time()))
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            await run_engine(engine, prompts, TOKENS)
            n += 1
        wall = time.perf_counter() - start
        return {
            "model": source,
            "waves": n,
            "tok_per_s": round(n * batch * TOKENS / wall, 2),
            "cpu_threads": engine.stats().get("cpu_threads"),
        }

    try:
        return asyncio.run(waves())
    finally:
        engine.shutdown()


def run_together(models: list[str], args, adaptive: bool) -> list[dict]:
    """One process per model, all decoding over the same `args.seconds`."""
    start_at = time.time() + args.load_s
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.lab.bench_cpu_threads",
                "--worker",
                m,
                "--batch",
                str(args.batch),
                "--seconds",
                str(args.seconds),
                "--start-at",
                str(start_at),
                *(["--adaptive"] if adaptive else []),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for m in models
    ]
    results = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"a worker failed (exit {p.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def serve_together(args, adaptive: bool) -> list[dict]:
    """Both models of serve_config.yaml busy at once through `serve run`, `args.batch` clients each."""
    import tempfile

    import yaml

    from deployments.launch import ROOT, start, stop

    from ..client import wait_for_state

    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    for model in config["applications"][0]["args"]["models"]:
        model.setdefault("engine", {})["adaptive_cpu_threads"] = adaptive
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(config, f)
    server = start(f.name)
    try:
        for m in MODELS:
            wait_for_state(m, "loaded")
        return asyncio.run(http_waves(args))
    finally:
        stop(server, group=True, timeout_s=120, stop_ray=False)
        os.unlink(f.name)


async def http_waves(args) -> list[dict]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none", max_retries=0, timeout=300)

    async def one(model: str, i: int) -> int:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"Write a long essay about topic {i}."}],
            max_tokens=TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        tokens = 0
        async for chunk in stream:
            tokens = chunk.usage.completion_tokens if chunk.usage else tokens
        return tokens

    async def model_waves(model: str, seconds: float) -> dict:
        start, tokens = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            tokens += sum(await asyncio.gather(*(one(model, i) for i in range(args.batch))))
        return {"model": model, "tok_per_s": round(tokens / (time.perf_counter() - start), 2)}

    async with client:  # closed inside the event loop that made it
        await asyncio.gather(*(model_waves(m, 8) for m in MODELS))  # warm-up
        stats = await asyncio.gather(*(model_waves(m, args.seconds) for m in MODELS))
    with urllib.request.urlopen("http://127.0.0.1:8000/metrics") as r:
        metrics = r.read().decode()
    for s in stats:  # the threads each engine had at the end, from the router's /metrics
        line = next((x for x in metrics.splitlines() if "cpu_threads" in x and s["model"] in x), None)
        s["cpu_threads"] = int(float(line.split()[-1])) if line else None
    return stats


def table(rows: list[dict]) -> str:
    lines = [
        "| round | mode | " + " | ".join(f"{m} tok/s (threads)" for m in MODELS) + " | both, tok/s |",
        "|---|---|" + "---|" * len(MODELS) + "---|",
    ]
    for r in rows:
        cells = [f"{x['tok_per_s']} ({x['cpu_threads'] or 'fixed'})" for x in r["models"]]
        lines.append(f"| {r['round']} | {r['mode']} | " + " | ".join(cells) + f" | {r['total']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--load-s", type=float, default=40.0, help="time given to load and warm up")
    parser.add_argument("--serve", action="store_true", help="through `serve run` of serve_config.yaml")
    parser.add_argument("--json-out")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--adaptive", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from engine.loading.cpu_fast_path import reexec_with_openblas

    reexec_with_openblas()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.seconds, args.start_at, args.adaptive)), flush=True)
        return
    together = serve_together if args.serve else lambda a, adaptive: run_together(MODELS, a, adaptive)
    rows = []
    for r in range(1, args.rounds + 1):
        for mode in ("fixed", "adaptive"):
            print(f"round {r}: both models, {mode} threads ...", file=sys.stderr, flush=True)
            models = together(args, mode == "adaptive")
            rows.append(
                {"round": r, "mode": mode, "models": models, "total": round(sum(m["tok_per_s"] for m in models), 2)}
            )
    alone = []
    for m in [] if args.serve else MODELS:
        print(f"{m} alone ...", file=sys.stderr, flush=True)
        alone += run_together([m], args, True)
    doc = {
        "machine": {"cores": os.cpu_count(), "load_avg": os.getloadavg()},
        "serve": args.serve,
        "batch": args.batch,
        "tokens": TOKENS,
        "seconds": args.seconds,
        "together": rows,
        "alone": alone,
    }
    emit(
        doc,
        table(rows)
        + "\n\nalone, adaptive: "
        + ", ".join(f"{a['model']} {a['tok_per_s']} tok/s ({a['cpu_threads']} threads)" for a in alone),
        args.json_out,
    )


if __name__ == "__main__":
    main()
