"""Soak: steady load with random client disconnects for many minutes; is memory flat?

Starts `serve run CONFIG` (default serve_config.yaml), then keeps `--clients` streaming clients
busy over every model for `--minutes`: each sends a chat completion with a random prompt and
max_tokens, and one in `--leave-every` leaves mid-stream. The RSS of the whole process tree is
sampled every `--sample-s` seconds. Prints JSON and a table (requests by outcome, RSS after the
warm-up minute and at the end, the least-squares RSS slope in MiB per minute) and plots the RSS.

    python -m benchmarks soak --minutes 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from benchmarks.bench_governor import RssSampler, start
from benchmarks.client import BASE, model_cards
from benchmarks.report import machine, md_table, write_json
from deployments import launch


async def client_loop(
    c: httpx.AsyncClient, models: list[str], rng: random.Random, until: float, leave_every: int, outcomes: Counter
) -> None:
    while time.monotonic() < until:
        body = {
            "model": rng.choice(models),
            "stream": True,
            "max_tokens": rng.randint(4, 48),
            "temperature": 0.8,
            "messages": [{"role": "user", "content": f"Write about item {rng.randint(0, 10**6)}."}],
        }
        leave_at = rng.randint(1, 6) if rng.randrange(leave_every) == 0 else None
        try:
            async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    outcomes[f"http {r.status_code}"] += 1
                    await asyncio.sleep(float(r.headers.get("retry-after", 1)))
                    continue
                chunks = 0
                async for line in r.aiter_lines():
                    if '"error"' in line:
                        outcomes["error event"] += 1
                        break
                    chunks += line.startswith("data: {")
                    if leave_at is not None and chunks >= leave_at:
                        outcomes["left mid-stream"] += 1
                        break
                else:
                    outcomes["ok"] += 1
        except httpx.HTTPError as exc:
            outcomes[f"transport {type(exc).__name__}"] += 1


async def drive(args, models: list[str]) -> Counter:
    outcomes: Counter = Counter()
    until = time.monotonic() + args.minutes * 60
    async with httpx.AsyncClient(base_url=BASE, timeout=300) as c:
        await asyncio.gather(
            *(client_loop(c, models, random.Random(i), until, args.leave_every, outcomes) for i in range(args.clients))
        )
    return outcomes


def rss_by_process(pid: int) -> dict[str, int]:
    """RSS (MiB) of each process in the tree, by Ray actor or program name."""
    import psutil

    from benchmarks.openai_bench.cpu import group_of

    root = psutil.Process(pid)
    out: dict[str, int] = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            label = group_of(p.cmdline(), p.name())
            out[label] = out.get(label, 0) + p.memory_info().rss // 2**20
        except psutil.Error:
            pass
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def slope_mib_per_min(samples: list[tuple[float, int]]) -> float | None:
    if len(samples) < 3:
        return None
    n = len(samples)
    mx_, my = sum(t for t, _ in samples) / n, sum(r for _, r in samples) / n
    var = sum((t - mx_) ** 2 for t, _ in samples)
    return round(60 * sum((t - mx_) * (r - my) for t, r in samples) / var, 2) if var else None


def report(samples: list, outcomes: Counter, warmup_s: float) -> dict:
    steady = [(t, r) for t, r in samples if t >= warmup_s]
    return {
        "outcomes": dict(outcomes),
        "rss_after_warmup_mib": steady[0][1] if steady else None,
        "rss_end_mib": samples[-1][1] if samples else None,
        "rss_peak_mib": max(r for _, r in samples),
        "rss_slope_mib_per_min": slope_mib_per_min(steady),
    }


def plot(samples: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot([t / 60 for t, _ in samples], [r for _, r in samples])
    ax.set_xlabel("minutes")
    ax.set_ylabel("process tree RSS (MiB)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="serve_config.yaml")
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--leave-every", type=int, default=5, help="one request in N leaves mid-stream")
    ap.add_argument("--sample-s", type=float, default=2.0)
    ap.add_argument(
        "--kv-mb",
        type=int,
        help="override every model's engine.cache_memory_mb (a small pool fills "
        "in the first minute, so what grows after it is not the KV cache)",
    )
    ap.add_argument("--out", default="docs/results")
    return ap.parse_args(argv)


def soak(args: argparse.Namespace) -> dict:
    """`serve run` of the config under load for the run's minutes: the JSON document."""
    import yaml

    cfg = yaml.safe_load(Path(args.config).read_text())
    if args.kv_mb:
        for app in cfg["applications"]:
            for model in app["args"]["models"]:
                model.setdefault("engine", {})["cache_memory_mb"] = args.kv_mb
    proc = start(cfg)
    models = list(model_cards())
    rss = RssSampler(proc.pid, args.sample_s)
    rss.start()
    print(f"soaking {models} with {args.clients} clients for {args.minutes} min ...", file=sys.stderr, flush=True)
    try:
        outcomes = asyncio.run(drive(args, models))
        after = httpx.get(f"{BASE}/health", timeout=30).json()
        kv_pools = {
            m: httpx.get(f"{BASE}/v1/models/{m}/cache", timeout=30).json()["cache"].get("bytes") for m in models
        }
        by_process = rss_by_process(proc.pid)
    finally:
        rss.stop()
        launch.stop(proc)
    return {
        "benchmark": "soak",
        "machine": machine(),
        "settings": vars(args),
        "health_after": after,
        "kv_pool_bytes_end": kv_pools,
        "rss_mib_by_process_end": by_process,
        **report(rss.samples, outcomes, warmup_s=60),
        "rss_mib": rss.samples,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    doc = soak(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"soak_kv{args.kv_mb}" if args.kv_mb else "soak"
    write_json(doc, out / f"{name}_cpu.json", indent=1)
    plot(
        doc["rss_mib"],
        out / f"{name}_rss.png",
        f"serve run under load: {args.clients} clients, {args.minutes:g} min"
        + (f", KV pools {args.kv_mb} MiB" if args.kv_mb else ""),
    )
    print(json.dumps({k: v for k, v in doc.items() if k != "rss_mib"}, indent=1))
    print(md_table(["outcome", "requests"], [[k, v] for k, v in sorted(doc["outcomes"].items())]))
    row = [f"{doc['rss_after_warmup_mib']} MiB", f"{doc['rss_end_mib']} MiB", f"{doc['rss_peak_mib']} MiB"]
    print(
        md_table(
            ["RSS after 1 min", "RSS at the end", "peak", "slope"], [[*row, f"{doc['rss_slope_mib_per_min']} MiB/min"]]
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
