"""What an idle model costs the busy one, through `serve run` (default serve_config.yaml).

    python -m benchmarks idle

Starts `serve run`, waits for both models, then:
1. idle: CPU of every process of the tree over 30 s with nothing running (psutil);
2. SmolLM2 at 5 streaming clients (64 tokens, 3 waves) with Gemma loaded and idle, then with
   Gemma unloaded (`POST /v1/models/gemma-3-270m/unload`), then loaded again — one run, so the
   three are comparable; also the cores each process used during the first of them.
Stops the server with SIGINT to its process group. Prints JSON, then a table.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from deployments import launch

from .client import BASE, post_empty, wait_for_state
from .report import emit

BUSY, IDLE = "smollm2-135m-instruct", "gemma-3-270m"


def cpu_by_process(seconds: float, work=None) -> tuple[list[dict], object]:
    """Cores each process used while `work` (a coroutine factory) ran, or for `seconds` idle."""
    import psutil

    procs = list(psutil.process_iter(["cmdline"]))
    before = {}
    for p in procs:
        try:
            before[p.pid] = sum(p.cpu_times()[:2])
        except psutil.Error:
            pass
    start = time.time()
    result = asyncio.run(work()) if work else time.sleep(seconds)
    wall = time.time() - start
    rows = []
    for p in procs:
        try:
            used = (sum(p.cpu_times()[:2]) - before[p.pid]) / wall
        except (psutil.Error, KeyError):
            continue
        if used >= 0.005:
            rows.append({"process": " ".join(p.info["cmdline"] or [])[:70], "cores": round(used, 3)})
    return sorted(rows, key=lambda r: -r["cores"]), result


async def waves(n_clients: int = 5, n_waves: int = 3) -> list[float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=BASE + "/v1", api_key="none", max_retries=0)

    async def one(i: int) -> int:
        stream = await client.chat.completions.create(
            model=BUSY,
            messages=[{"role": "user", "content": f"Write a long essay about topic {i}."}],
            max_tokens=64,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        tokens = 0
        async for chunk in stream:
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return tokens

    rates = []
    for _ in range(n_waves + 1):  # the first wave warms up
        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i) for i in range(n_clients))))
        rates.append(round(tokens / (time.perf_counter() - start), 2))
    return rates[1:]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="serve_config.yaml")
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731 - a one-line local helper
    server = launch.start(args.config)
    try:
        wait_for_state(BUSY, "loaded")
        wait_for_state(IDLE, "loaded")
        time.sleep(5)
        say("idle: sampling CPU for 30 s")
        idle, _ = cpu_by_process(30)
        say("5 clients, both loaded")
        busy_cpu, both = cpu_by_process(0, waves)
        post_empty(f"/v1/models/{IDLE}/unload")
        wait_for_state(IDLE, "unloaded")
        say("5 clients, the idle model unloaded")
        alone = asyncio.run(waves())
        post_empty(f"/v1/models/{IDLE}/load")
        wait_for_state(IDLE, "loaded")
        say("5 clients, both loaded again")
        again = asyncio.run(waves())
    finally:
        launch.stop(server, group=True, timeout_s=120, stop_ray=False)
    doc = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "config": args.config,
        "idle_cpu": idle,
        "idle_cores_total": round(sum(r["cores"] for r in idle), 3),
        "busy_cpu": busy_cpu,
        "tok_s_5": {"both loaded": both, f"{IDLE} unloaded": alone, "both loaded again": again},
    }
    table = ["| SmolLM2 at 5 clients | tok/s per wave |", "|---|---|"]
    table += [f"| {k} | {' / '.join(map(str, v))} |" for k, v in doc["tok_s_5"].items()]
    table.append(
        f"\nidle tree: {doc['idle_cores_total']} cores; top: "
        + ", ".join(f"{r['process'][:40]} {r['cores']}" for r in idle[:4])
    )
    emit(doc, "\n".join(table), args.json_out)


if __name__ == "__main__":
    main()
