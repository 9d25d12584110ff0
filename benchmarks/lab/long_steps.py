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
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics

from ..bench_accel import engine_request, prompt_text
from ..probe import after_each_step
from ..report import emit, md_table


def snapshot(engine) -> tuple:
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
    )


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


async def one_wave(engine, args, tag: str, notes: list) -> dict:
    engine.step_log = collections.deque()
    notes.clear()
    notes.append(snapshot(engine))
    await asyncio.gather(
        *(engine_request(engine, prompt_text(f"{tag}c{i}"), args.max_tokens) for i in range(args.clients))
    )
    steps, engine.step_log = list(engine.step_log), None
    snaps = list(notes)
    durations = [1000 * s[1] for s in steps]
    median = statistics.median(durations)
    long = []
    for i, ms in enumerate(durations):
        if ms > 2 * median and i + 1 < len(snaps):
            long.append(
                {
                    "step": i,
                    "ms": round(ms, 1),
                    "rows": snaps[i + 1][5],
                    "cap": snaps[i + 1][1],
                    "what": changes(snaps[i], snaps[i + 1]),
                }
            )
    return {
        "steps": len(steps),
        "median_ms": round(median, 2),
        "total_ms": round(sum(durations), 1),
        "long": long,
        "long_ms": round(sum(x["ms"] for x in long), 1),
    }


async def measure(args) -> dict:
    from engine.config import EngineConfig
    from engine.engine import AsyncEngine

    engine = AsyncEngine.from_source(args.model, EngineConfig(max_num_seqs=max(64, args.clients)))
    notes: list = []
    after_each_step(engine.scheduler, lambda: notes.append(snapshot(engine)))
    waves = []
    try:
        for w in range(args.waves + 1):
            wave = await one_wave(engine, args, f"w{w}", notes)
            print(
                f"wave {w}: {wave['steps']} steps, median {wave['median_ms']} ms, "
                f"{len(wave['long'])} long ({wave['long_ms']} ms)",
                flush=True,
            )
            if w:
                waves.append(wave)
    finally:
        engine.shutdown()
    tally = collections.Counter(" + ".join(x["what"]) for wave in waves for x in wave["long"])
    return {
        "model": args.model,
        "clients": args.clients,
        "max_tokens": args.max_tokens,
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
    return out + "\n\n" + md_table(["what changed at a long step", "long steps"], sorted(doc["tally"].items()))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="synthetic:qwen3-0.6b-8bit")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--waves", type=int, default=4)
    p.add_argument("--out", help="write the JSON here too")
    args = p.parse_args(argv)
    doc = asyncio.run(measure(args))
    emit(doc, table(doc), args.out)


if __name__ == "__main__":
    main()
