"""What an engine's long decode steps coincide with (issue 36): on an H100, 10-17 steps of a
64-client wave take over twice the median step (300-630 ms of a ~2.3 s wave), for the engine alone
and through `serve run` alike (docs/lab-notebook.md, *A burst in one step*).

    python -m benchmarks.lab.long_steps --clients 64 --waves 4

AsyncEngine in this process, waves of `--clients` distinct 32-byte prompts sent together,
`--max-tokens` greedy tokens each. After every step (on the engine's thread, benchmarks.probe) it
notes what may make a step long: the working copies' geometry (a new one is a gather of every
row's blocks; a larger capacity, a copy that grows), the block pool's growths, working-copy
builds, compiled-decode calls, traces and uncompiled calls, and the step's rows. Prints, per wave,
every step over twice the median with what changed at it, and a tally: how many long steps each
kind of change explains. The first wave warms up and is not counted.

`--parts`: each long step also gets its parts' wall time (bench_step_phases' timers: the
scheduler's step, the loop's step within it, and in that the decode's issue and its compiled call,
the prefill's issue and the read that waits for the device, the rest being the launch; admission;
delivery), and the steady steps' median parts beside them. `--beside serve`: a `serve run` of the
same model (accel's YAML) idles beside the engine while it runs, as in `python -m benchmarks
accel`, whose engine-alone waves had 4-14 long steps where this lab had one. `--limits`: MLX's
memory and cache limits set as a model replica sets them (engine.memory.apply_process_limits, which
accel's engine row applies too); `--cache-share 0.25` with it: the cache limit a replica set before
2026-12-08 (a quarter of its share). `--warm-clients 64 --clients 1`: lone requests after a wide
wave, as accel's engine row meets them (its warm-up runs every width first). `--grow-pool 3000`:
the KV pool grown to 3,000 blocks after the warm wave (accel's waves leave it large).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import statistics
import tempfile
from pathlib import Path

from .. import accel_servers
from ..bench_accel import engine_request, prompt_text
from ..probe import after_each_step
from ..report import emit, md_table
from .bench_step_phases import timers

PARTS = (
    "sched.step",
    "loop.step",
    "issue_decode",
    "compiled_call",
    "decode_copies",
    "issue_prefill",
    "read",
    "admit",
    "deliver",
)


def snapshot(engine, parts: collections.Counter | None = None) -> tuple:
    sched = engine.scheduler
    cache, compiled = sched.cache, sched.gen.compiled
    ctx = getattr(cache, "ctx", None)
    geom = getattr(ctx, "geometry", None)
    pool = getattr(cache, "pool", None)
    return (
        geom.gen if geom is not None else None,
        geom.cap if geom is not None else None,
        pool.counters["grows"] if pool is not None else 0,
        ctx.counters["working_copy_builds"] if ctx is not None else 0,
        (compiled.steps, compiled.traces, compiled.eager_steps) if compiled is not None else (0, 0, 0),
        len(sched.gen.batch.rows) if getattr(sched.gen, "batch", None) is not None else 0,
        {k: parts[k] for k in PARTS} if parts is not None else {},
    )


def step_parts(before: tuple, after: tuple) -> dict[str, float]:
    """Each part's ms in the step between two snapshots."""
    return {k: round(1000 * (after[6][k] - before[6][k]), 2) for k in after[6]}


def changes(before: tuple, after: tuple) -> list[str]:
    what = []
    if after[0] != before[0]:
        what.append("new geometry")
    elif after[1] != before[1]:
        what.append("copy grew")
    if after[2] != before[2]:
        what.append("pool grew")
    if after[3] != before[3]:
        what.append("copy built")
    if after[4][1] != before[4][1]:
        what.append("trace")
    if after[4][2] != before[4][2]:
        what.append("uncompiled")
    if after[5] != before[5]:
        what.append("rows changed")
    return what or ["nothing seen"]


async def one_wave(engine, args, tag: str, notes: list, parts: collections.Counter | None, clients: int) -> dict:
    engine.step_log = collections.deque()
    notes.clear()
    notes.append(snapshot(engine, parts))
    results = await asyncio.gather(
        *(engine_request(engine, prompt_text(f"{tag}c{i}"), args.max_tokens) for i in range(clients))
    )
    steps, engine.step_log = list(engine.step_log), None
    snaps = list(notes)
    durations = [1000 * s[1] for s in steps]
    median = statistics.median(durations)
    long, steady = [], []
    for i, ms in enumerate(durations):
        if i + 1 >= len(snaps):
            break
        parts = step_parts(snaps[i], snaps[i + 1])
        if ms <= 2 * median:
            steady.append(parts)
            continue
        step = {"step": i, "ms": round(ms, 1), "rows": snaps[i + 1][5], "cap": snaps[i + 1][1]}
        long.append({**step, "what": changes(snaps[i], snaps[i + 1]), **({"parts": parts} if parts else {})})
    return {
        "steps": len(steps),
        "ttft_p50_ms": round(1000 * statistics.median(r.ttft for r in results if r.ttft is not None), 1),
        "median_ms": round(median, 2),
        "total_ms": round(sum(durations), 1),
        "long": long,
        "long_ms": round(sum(x["ms"] for x in long), 1),
        "steady_parts_median_ms": {k: round(statistics.median(p[k] for p in steady), 2) for k in PARTS}
        if steady and steady[0]
        else {},
    }


@contextlib.contextmanager
def serve_beside(source: str, max_num_seqs: int):
    """`serve run` of the same model with accel's YAML, ready and idle, for the block's length."""
    from engine.loading.loader import default_cache_dir
    from engine.loading.synthetic import local_source

    with tempfile.TemporaryDirectory() as workdir:
        config = accel_servers.write_yaml(local_source(source, default_cache_dir()), max_num_seqs, Path(workdir))
        server = accel_servers.wait_ready(accel_servers.launch_serve(config, Path(workdir)), 300)
        if server.error:
            raise RuntimeError(server.error)
        print(f"serve run ready beside in {server.ready_s} s", flush=True)
        try:
            yield
        finally:
            accel_servers.stop(server)


async def measure(args) -> dict:
    with contextlib.ExitStack() as stack:
        if args.beside == "serve":
            stack.enter_context(serve_beside(args.model, max(64, args.clients)))
        parts = stack.enter_context(timed_parts()) if args.parts else None
        return await measure_engine(args, parts)


@contextlib.contextmanager
def timed_parts():
    totals: collections.Counter = collections.Counter()
    with timers(totals):
        yield totals


async def measure_engine(args, parts: collections.Counter | None) -> dict:
    import mlx.core as mx

    from engine.config import EngineConfig
    from engine.engine import AsyncEngine
    from engine.memory import apply_process_limits

    engine = AsyncEngine.from_source(args.model, EngineConfig(max_num_seqs=max(64, args.clients)))
    limits = apply_process_limits(engine.footprint.total) if args.limits else {}
    if args.limits and args.cache_share is not None:  # another cache limit than the replica's
        limits["cache_limit"] = int(engine.footprint.total * args.cache_share)
        mx.set_cache_limit(limits["cache_limit"])
    notes: list = []
    grow: list[int] = []  # a pool size to grow to, on the engine's thread, after the step at hand

    def after_step() -> None:
        if grow:
            engine.scheduler.cache.pool._grow(grow.pop(), None)
        notes.append(snapshot(engine, parts))

    after_each_step(engine.scheduler, after_step)
    waves = []
    try:
        for w in range(args.waves + 1):
            clients = args.clients if w else (args.warm_clients or args.clients)
            wave = await one_wave(engine, args, f"w{w}", notes, parts, clients)
            print(
                f"wave {w}: {wave['steps']} steps, median {wave['median_ms']} ms, TTFT p50 {wave['ttft_p50_ms']} ms, "
                f"{len(wave['long'])} long ({wave['long_ms']} ms)",
                flush=True,
            )
            if w:
                waves.append(wave)
            elif args.grow_pool:  # between the warm wave and the counted ones, in a request of its own
                grow.append(args.grow_pool)
                await engine_request(engine, prompt_text("grow"), 2)
    finally:
        engine.shutdown()
    tally = collections.Counter(" + ".join(x["what"]) for wave in waves for x in wave["long"])
    return {
        "model": args.model,
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "beside": args.beside,
        "limits": limits,  # MLX's memory and cache limits, as a model replica sets them (--limits)
        "footprint_bytes": engine.footprint.total,
        "pool_blocks": engine.scheduler.cache.pool.num_blocks,
        "mlx_memory": {"peak": mx.get_peak_memory(), "active": mx.get_active_memory(), "cache": mx.get_cache_memory()},
        "waves": waves,
        "tally": dict(tally),
    }


def table(doc: dict) -> str:
    rows = [
        [
            i,
            w["steps"],
            w["median_ms"],
            len(w["long"]),
            w["long_ms"],
            "; ".join(f"{x['step']}:{x['ms']}ms cap {x['cap']} {'+'.join(x['what'])}" for x in w["long"]),
        ]
        for i, w in enumerate(doc["waves"], 1)
    ]
    out = md_table(
        ["wave", "steps", "median ms", "long steps", "ms in them", "each: step, ms, capacity, what changed"], rows
    )
    out += "\n\n" + md_table(["what changed at a long step", "long steps"], sorted(doc["tally"].items()))
    return out + parts_table(doc["waves"])


def parts_table(waves: list[dict]) -> str:
    """Each part's median ms in the long steps and in the steady ones (with --parts)."""
    long = [x["parts"] for w in waves for x in w["long"] if x.get("parts")]
    steady = [w["steady_parts_median_ms"] for w in waves if w["steady_parts_median_ms"]]
    if not long or not steady:
        return ""
    rows = [
        [k, statistics.median(p[k] for p in long), max(p[k] for p in long), statistics.median(p[k] for p in steady)]
        for k in PARTS
    ]
    return "\n\n" + md_table(["part", "long steps: median ms", "max ms", "steady steps: median ms"], rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="synthetic:qwen3-0.6b-8bit")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--waves", type=int, default=4)
    p.add_argument("--parts", action="store_true", help="time each step's parts (wraps engine methods)")
    p.add_argument("--limits", action="store_true", help="MLX's memory and cache limits as a replica sets them")
    p.add_argument(
        "--cache-share", type=float, help="with --limits: MLX's cache limit as this share of the footprint instead"
    )
    p.add_argument(
        "--warm-clients",
        type=int,
        help="the first (uncounted) wave's clients: e.g. 64 before lone requests, as in accel",
    )
    p.add_argument(
        "--grow-pool",
        type=int,
        help="after the warm wave, grow the KV block pool to this many blocks (a cost that scales with it)",
    )
    p.add_argument("--beside", choices=["none", "serve"], default="none", help="a server idling beside")
    p.add_argument("--out", help="write the JSON here too")
    args = p.parse_args(argv)
    if args.cache_share is not None and not args.limits:
        p.error("--cache-share changes the cache limit that --limits sets: give --limits too")
    doc = asyncio.run(measure(args))
    emit(doc, table(doc), args.out)


if __name__ == "__main__":
    main()
