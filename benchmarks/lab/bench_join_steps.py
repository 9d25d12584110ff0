"""What a step that takes newcomers costs, beside a steady decode step, part by part.

    python -m benchmarks.lab.bench_join_steps --model synthetic:qwen3-0.6b-8bit   # on the GPU machine

Through `serve run`, a burst reaches the engine spread over tens to hundreds of ms, so the engine
admits it over several steps, and each such step (a prompt chunk, then the first decode of a
changed batch) took 20-170 ms on an H100 against 6-20 ms for a steady decode step (the notebook's
*Where a burst's time goes through `serve run`*). This drives the scheduler synchronously on this
thread (no asyncio, no Ray: nothing else holds the GIL), `--join` requests a step for `--join-steps`
steps, then decodes steadily, and times each step and its parts (engine methods wrapped for the
run, as bench_step_phases does): `issue_decode` (its `decode_copies` and `compiled_call`),
`issue_prefill`, `async_eval` (on CUDA it encodes and launches the step's kernels) and `read` (the
host sync). `--rounds` repeats the schedule on the same scheduler, so the later rounds run with
every shape already seen. Each request's time to its first token is measured from its `add` (`--join
1 --join-steps 1`: one request alone). Prints JSON, then a table per step kind, ms.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

from ..report import emit, md_table
from .bench_step_phases import TIMED, timers

PARTS = ["issue_decode", "decode_copies", "compiled_call", "issue_prefill", "read"]


def run_schedule(sched, tokenizer, args, tag: str) -> tuple[list[dict], list[float]]:
    """One round: requests joining `args.join` a step, then steady decode until all finish. Its
    steps, and each request's time to its first token (ms, from its `add` to the step that
    returned it)."""
    import mlx.core as mx

    from engine import batch_loop
    from engine.request import Request
    from engine.sampling import SamplingParams
    from engine.text_stream import TextStream

    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    steps, totals, n, added, ttft = [], collections.Counter(), 0, {}, []
    launch = batch_loop.mx.async_eval

    def timed_launch(*arrays):
        start = time.perf_counter()
        launch(*arrays)
        totals["async_eval"] += time.perf_counter() - start

    batch_loop.mx.async_eval = timed_launch
    try:
        for step in range(100_000):
            joined = args.join if step < args.join_steps else 0
            for _ in range(joined):
                ids = tokenizer.encode(f"{tag} request {n}: the quick brown fox jumps over the lazy dog")[:32]
                added[f"{tag}-{n}"] = time.perf_counter()
                sched.add(Request(f"{tag}-{n}", ids, params, args.tokens, TextStream(tokenizer.detokenizer, [])))
                n += 1
            if not sched.has_work():
                break
            totals.clear()
            loop = sched.gen
            rows, prefilling = len(loop.batch.rows), len(loop.prefilling) + len(loop.joining)
            start = time.perf_counter()
            with timers(totals):
                outputs = sched.step()
            now = time.perf_counter()
            wall = now - start
            ttft += [1000 * (now - added.pop(o.request_id)) for o in outputs if o.request_id in added]
            kind = "join" if prefilling or len(loop.batch.rows) != rows else "steady"
            ms = {k: round(1000 * totals[k], 2) for k in [*PARTS, "async_eval"]}
            steps.append(
                {"step": step, "kind": kind, "rows": len(loop.batch.rows), "wall_ms": round(1000 * wall, 2), **ms}
            )
    finally:
        batch_loop.mx.async_eval = launch
        mx.synchronize()
    return steps, ttft


def summary(steps: list[dict]) -> dict:
    out = {}
    for kind in ("join", "steady"):
        rows = [s for s in steps if s["kind"] == kind]
        if rows:
            keys = ["wall_ms", *PARTS, "async_eval"]
            out[kind] = {"steps": len(rows), **{k: round(statistics.median(s[k] for s in rows), 2) for k in keys}}
    return out


def floor(model, join: int, tokens: int, repeats: int = 5) -> dict:
    """MLX's own cost of a join's work, with mlx_lm's cache and nothing of ours: a [join, tokens]
    prompt chunk, then one decode step of those rows, each evaluated alone (ms, median)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    prompt = mx.ones((join, tokens), dtype=mx.uint32)
    times = collections.defaultdict(list)
    for _ in range(repeats + 1):  # the first is a warm-up
        cache = make_prompt_cache(model)
        mx.synchronize()
        start = time.perf_counter()
        logits = model(prompt, cache=cache)
        mx.eval(logits, [c.state for c in cache])
        mid = time.perf_counter()
        mx.eval(model(mx.argmax(logits[:, -1:], axis=-1).astype(mx.uint32), cache=cache))
        end = time.perf_counter()
        times["prefill_ms"].append(1000 * (mid - start))
        times["decode_ms"].append(1000 * (end - mid))
    return {k: round(statistics.median(v[1:]), 2) for k, v in times.items()}


def main(argv=None) -> None:
    from engine.config import EngineConfig
    from engine.kv.manager import make_cache_manager
    from engine.loading.loader import load_model
    from engine.scheduler import Scheduler

    args = parse_args(argv)
    assert TIMED  # the same wrapped methods as bench_step_phases
    loaded = load_model(args.model)
    config = EngineConfig(max_num_seqs=max(64, args.join * args.join_steps))
    sched = Scheduler(loaded.model, loaded.tokenizer, config, make_cache_manager(loaded.model, config))
    rounds = []
    for r in range(args.rounds):
        steps, ttft = run_schedule(sched, loaded.tokenizer, args, f"r{r}")
        ttft_ms = {"p50": round(statistics.median(ttft), 2), "max": round(max(ttft), 2)}
        rounds.append({"round": r, "summary": summary(steps), "ttft_ms": ttft_ms, "steps": steps})
        print(f"round {r}: {summary(steps)} first token {ttft_ms}", flush=True)
    floors = {n: floor(loaded.model, n, 32) for n in sorted({1, args.join})}
    print(f"mlx_lm's own prefill + decode of [rows, 32] prompts: {floors}", flush=True)
    last = rounds[-1]["summary"]
    table = [[kind, s["steps"], s["wall_ms"], *(s[k] for k in [*PARTS, "async_eval"])] for kind, s in last.items()]
    doc = {
        "model": args.model,
        "join": args.join,
        "join_steps": args.join_steps,
        "tokens": args.tokens,
        "rounds": rounds,
        "mlx_lm_floor": floors,
    }
    emit(doc, md_table(["step kind", "steps", "wall", *PARTS, "async_eval"], table), args.out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="synthetic:qwen3-0.6b-8bit")
    p.add_argument("--join", type=int, default=4, help="requests joining a step")
    p.add_argument("--join-steps", type=int, default=16, help="steps that take newcomers")
    p.add_argument("--tokens", type=int, default=64, help="new tokens a request")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", help="write the JSON here")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
