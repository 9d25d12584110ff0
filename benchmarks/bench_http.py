"""Throughput and TTFT through Ray Serve over HTTP, next to the engine alone, in one run.

    python -m benchmarks http [--config serve_config.yaml] [--models NAME ...]
                                    [--concurrency 1 5 16] [--max-tokens 64] [--rounds 2]
                                    [--skip-engine] [--json-out PATH]

For each model: first the engine in this process (AsyncEngine, the model's engine options from the
config, OpenBLAS preloaded), then the same load over HTTP against `serve run CONFIG` started as a
subprocess. Each level runs `rounds` waves of `concurrency` streaming chat requests (the issue-3
prompts cycled, temperature 0, EOS ignored, fixed max_tokens). Reported: aggregate completion
tok/s, TTFT p50/p95, HTTP/engine throughput ratio and TTFT overhead; also the time from `serve run`
to the first answer and the memory of the serve process tree (RSS and PSS). Prints one JSON
document, then a markdown table. The two measurements never overlap, but other load on the
machine does show: compare figures of the same run only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.client import BASE, model_cards
from benchmarks.openai_bench.prompts import SEED_QUESTIONS
from benchmarks.report import emit
from deployments import launch

ROOT = Path(__file__).resolve().parents[1]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarize(results: list[tuple[float, int]], wall_s: float) -> dict:
    """results: (ttft seconds, completion tokens) per request."""
    ttfts = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {
        "requests": len(results),
        "tokens": tokens,
        "wall_s": round(wall_s, 3),
        "tok_s": round(tokens / wall_s, 2),
        "ttft_p50_ms": round(1000 * pct(ttfts, 0.5), 1),
        "ttft_p95_ms": round(1000 * pct(ttfts, 0.95), 1),
    }


# --- engine alone -------------------------------------------------------------------------------


async def engine_request(engine, i: int, max_tokens: int) -> tuple[float, int]:
    from engine.request import PromptInput
    from engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    stream = engine.submit(PromptInput(messages=[{"role": "user", "content": SEED_QUESTIONS[i % 5]}]), params)
    ttft, tokens = None, 0
    async for out in stream:
        if out.token_ids and ttft is None:
            ttft = time.perf_counter() - start
        tokens += len(out.token_ids)
    return ttft or 0.0, tokens


def bench_engine(model, levels: list[int], rounds: int, max_tokens: int) -> dict:
    from engine.engine import AsyncEngine

    engine = AsyncEngine.from_source(model.source, model.engine)
    try:
        asyncio.run(engine_request(engine, 0, 4))  # warm-up
        out = {}
        for n in levels:

            async def wave(n: int = n):
                return await asyncio.gather(*(engine_request(engine, i, max_tokens) for i in range(n)))

            results, start = [], time.perf_counter()
            for _ in range(rounds):
                results += asyncio.run(wave())
            out[str(n)] = summarize(results, time.perf_counter() - start)
        return out
    finally:
        engine.shutdown()


# --- over HTTP ----------------------------------------------------------------------------------


async def http_request(client, model: str, i: int, max_tokens: int) -> tuple[float, int]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": SEED_QUESTIONS[i % 5]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", f"{BASE}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft or 0.0, tokens


def serve_processes(deployment: str) -> dict:
    """The proxy, router and model replica processes, found by their Ray process titles."""
    import psutil

    wanted = {
        "proxy": "ray::ProxyActor",
        "router": "ServeReplica:orchard:OrchardRouter",
        "model": f"ServeReplica:orchard:{deployment}",
    }
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        for role, title in wanted.items():
            if title in cmd and role not in found:
                found[role] = p
    return found


def cpu_seconds(procs: dict) -> dict:
    out = {}
    for role, p in procs.items():
        try:
            t = p.cpu_times()
            out[role] = t.user + t.system
        except Exception:  # noqa: BLE001 - a process went away
            out[role] = 0.0
    return out


def bench_http_model(model, levels: list[int], rounds: int, max_tokens: int) -> dict:
    """Per level: throughput, TTFT and the CPU ms per generated token of the proxy, router and model."""
    import httpx

    procs = serve_processes(model.deployment_name)

    async def run_level(n: int):
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            await http_request(client, model.name, 0, 4)  # warm-up (and connection)
            results, cpu0, start = [], cpu_seconds(procs), time.perf_counter()
            for _ in range(rounds):
                results += await asyncio.gather(*(http_request(client, model.name, i, max_tokens) for i in range(n)))
            out = summarize(results, time.perf_counter() - start)
            cpu1 = cpu_seconds(procs)
            out["cpu_ms_per_token"] = {r: round(1000 * (cpu1[r] - cpu0[r]) / max(1, out["tokens"]), 2) for r in cpu1}
            return out

    return {str(n): asyncio.run(run_level(n)) for n in levels}


def start_serve(config: str) -> tuple[subprocess.Popen, float]:
    """Start `serve run` on a clean Ray; seconds until the first chat answer came back."""
    import httpx

    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}

    def answered() -> bool:
        try:
            model = list(model_cards(timeout_s=5))[0]
            r = httpx.post(f"{BASE}/v1/chat/completions", json={**body, "model": model}, timeout=60)
            return r.status_code == 200
        except (httpx.HTTPError, KeyError, IndexError):
            return False

    launch.ray_stop()
    proc = launch.start(config)
    return proc, launch.wait_until(proc, answered, 300, interval_s=0.5, failure="serve run did not answer")


def stop_serve(proc: subprocess.Popen) -> None:
    launch.stop(proc)


def tree_memory(pid: int) -> dict:
    import psutil

    root = psutil.Process(pid)
    rss = pss = 0
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        try:
            info = p.memory_full_info()
            rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return {"processes": len(procs), "rss_mb": round(rss / 2**20), "pss_mb": round(pss / 2**20)}


# --- report -------------------------------------------------------------------------------------


def compare(engine: dict | None, http: dict) -> dict:
    if not engine:
        return {}
    return {
        n: {
            "throughput_ratio": round(http[n]["tok_s"] / engine[n]["tok_s"], 3),
            "ttft_overhead_p50_ms": round(http[n]["ttft_p50_ms"] - engine[n]["ttft_p50_ms"], 1),
        }
        for n in http
        if n in engine
    }


def table(report: dict) -> str:
    rows = [
        "| model | clients | engine tok/s | HTTP tok/s | ratio | engine TTFT p50 | HTTP TTFT p50 | "
        "HTTP TTFT p95 | overhead p50 | CPU ms/token proxy/router/model |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for model, res in report["models"].items():
        for n, h in res["http"].items():
            e = (res.get("engine") or {}).get(n, {})
            c = res["compare"].get(n, {})
            cpu = "/".join(str(h["cpu_ms_per_token"].get(r, "-")) for r in ("proxy", "router", "model"))
            rows.append(
                f"| {model} | {n} | {e.get('tok_s', '-')} | {h['tok_s']} | {c.get('throughput_ratio', '-')} | "
                f"{e.get('ttft_p50_ms', '-')} ms | {h['ttft_p50_ms']} ms | {h['ttft_p95_ms']} ms | "
                f"{c.get('ttft_overhead_p50_ms', '-')} ms | {cpu} |"
            )
    if report["memory"]:
        rows.append(
            f"\nserve run → first answer: {report['serve_start_to_first_answer_s']} s; "
            f"process tree: {report['memory']['rss_mb']} MB RSS, {report['memory']['pss_mb']} MB PSS "
            f"({report['memory']['processes']} processes)"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    from engine.loading.cpu_fast_path import reexec_with_openblas

    reexec_with_openblas()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="serve_config.yaml")
    ap.add_argument("--models", nargs="*", help="model names from the config (default: all)")
    ap.add_argument("--concurrency", nargs="*", type=int, default=[1, 5, 16])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-engine", action="store_true", help="HTTP only")
    ap.add_argument(
        "--attach",
        action="store_true",
        help="benchmark the server already running on 127.0.0.1:8000 (started from --config) "
        "instead of starting and stopping `serve run`",
    )
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    from deployments.config import check_serve_config

    models = [m for m in check_serve_config(args.config)[0].models if not args.models or m.name in args.models]
    report = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "config": args.config,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "models": {},
    }
    engine = (
        {}
        if args.skip_engine
        else {m.name: bench_engine(m, args.concurrency, args.rounds, args.max_tokens) for m in models}
    )
    proc, ready_s = (None, None) if args.attach else start_serve(args.config)
    try:
        report["serve_start_to_first_answer_s"] = round(ready_s, 1) if ready_s else None
        report["memory"] = tree_memory(proc.pid) if proc else None
        for m in models:
            http = bench_http_model(m, args.concurrency, args.rounds, args.max_tokens)
            report["models"][m.name] = {
                "engine": engine.get(m.name),
                "http": http,
                "compare": compare(engine.get(m.name), http),
            }
    finally:
        if proc is not None:
            stop_serve(proc)
    emit(report, "\n" + table(report), args.json_out)


if __name__ == "__main__":
    main()
