"""Where an engine step's wall time goes, beside the bare decode loops on the same device.

    python -m benchmarks.lab.bench_step_phases --model synthetic:qwen3-0.6b-8bit --batches 1 5 16   # GPU
    python -m benchmarks.lab.bench_step_phases --ragged --kernels   # padded batches; kernels a step (CUDA)

For each batch size, in interleaved rounds: the compiled decode step alone in a bare pipelined
loop (`bench_decode_step`'s `select` on CUDA, `slice` elsewhere), the model over mlx_lm's own
KVCache in the same loop (no mask), and then our AsyncEngine with the same number of requests,
with the engine's own methods timed (wrapped for the run, restored after):
- `loop.step`: a whole step of the batch loop; `launch + wait` is what is left of it once the
  parts below are taken out: MLX's `async_eval` (on CUDA it encodes and launches every kernel of
  the step on this thread) and the wait for the device.
- `issue_decode` (its `compiled_call`: replaying the compiled graph; `decode_copies`: the plan
  and the working copies), `issue_prefill`, `read` (the host sync and the tokens' bookkeeping).
- `on_token` (the scheduler's per-token work: detokenizer, stop strings), `deliver` (outputs to
  the asyncio side), `admit`.
On CUDA a batch with no padding decodes eagerly and unmasked (`engine.unpadded_decode`), and
then has no `compiled_call`; the table counts the compiled steps. These prompts are all 32 tokens,
so batch 1 always decodes eagerly there, and 5 and 16 when their rows were admitted in one step;
`--ragged` gives prompts of 32–47 tokens, so batches above one are padded and compiled. `--kernels`
adds the CUDA kernels a loop step (torch.profiler; a prefill step counts as a step) for one more
engine run and for the two bare loops. The engine's figures include the timers' own cost (a
few µs a call; `on_token` is called once a row a step). Prints JSON, then a table, per step in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import time

from ..report import emit

# (owner module, class or None, attribute, label): what the engine run times.
TIMED = [
    ("engine.scheduler", "Scheduler", "step", "sched.step"),
    ("engine.batch_loop", "BatchLoop", "step", "loop.step"),
    ("engine.batch_loop", "BatchLoop", "_issue_decode", "issue_decode"),
    ("engine.compiled_step", "CompiledDecode", "__call__", "compiled_call"),
    ("engine.kv.paged_cache", "PagedContext", "decode_copies", "decode_copies"),
    ("engine.batch_loop", "BatchLoop", "_issue_prefill", "issue_prefill"),
    ("engine.batch_loop", "BatchLoop", "_read", "read"),
    ("engine.scheduler", "Scheduler", "_on_token", "on_token"),
    ("engine.scheduler", "Scheduler", "_admit", "admit"),
    ("engine.engine", "AsyncEngine", "_deliver", "deliver"),
]
PARTS = ("issue_decode", "issue_prefill", "read")  # loop.step = these + launch and wait


@contextlib.contextmanager
def timers(totals: collections.Counter):
    """Wrap each TIMED callable to add its wall time to `totals`; put them back after."""
    import importlib

    saved = []
    for module_name, cls, attr, label in TIMED:
        owner = importlib.import_module(module_name)
        owner = getattr(owner, cls) if cls else owner
        original = getattr(owner, attr)

        def timed(*args, _f=original, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _f(*args, **kwargs)
            finally:
                totals[_label] += time.perf_counter() - start
                totals[_label + " calls"] += 1

        saved.append((owner, attr, original))
        setattr(owner, attr, functools.wraps(original)(timed))
    try:
        yield
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)


def per_step(totals: collections.Counter, steps: int) -> dict:
    ms = {k: round(1000 * v / steps, 3) for k, v in totals.items() if not k.endswith(" calls")}
    ms["launch + wait"] = round(ms.get("loop.step", 0.0) - sum(ms.get(k, 0.0) for k in PARTS), 3)
    return ms


async def measure(engine, model, batch: int, args, write: str) -> dict:
    import mlx.core as mx

    from engine.compiled_step import _decode_step

    from ..bench_engine import prompt_ids, run_engine
    from .bench_decode_step import kernels, mlx_lm_step, our_step, pipelined

    tokens = args.tokens
    prompts = prompt_ids(engine.tokenizer, batch, ragged=args.ragged)
    await run_engine(engine, prompts, tokens)  # every shape of the run traced before it counts
    bare = our_step(model, mx.compile(_decode_step(model, write == "select", False)), batch, 256)
    plain = mlx_lm_step(model, batch, 256)
    for loop in (bare, plain):  # warm-up
        pipelined(loop, batch, 16)
    row = {"batch": batch, "rounds": []}
    for _ in range(args.rounds):
        loops = {"bare": pipelined(bare, batch, tokens), "mlx_lm": pipelined(plain, batch, tokens)}
        totals = collections.Counter()
        with timers(totals):
            result = await run_engine(engine, prompts, tokens)
        steps = totals["loop.step calls"]
        row["rounds"].append(
            {
                "engine_tok_s": result["tok_per_s"],
                "engine_ms_per_step": round(1000 * result["wall_s"] / steps, 2),
                **{f"{k}_tok_s": round(v, 1) for k, v in loops.items()},
                **{f"{k}_ms_per_step": round(1000 * batch / v, 2) for k, v in loops.items()},
                "steps": steps,
                "compiled_steps": totals["compiled_call calls"],
                "ms": per_step(totals, steps),
            }
        )
        print(
            f"batch {batch}: engine {result['tok_per_s']} tok/s, bare {loops['bare']:.0f}, "
            f"mlx_lm {loops['mlx_lm']:.0f}",
            flush=True,
        )
    if args.kernels:
        row["kernels"] = {
            "engine": await engine_kernels(engine, prompts, tokens),
            "bare": kernels(bare, batch, 64),
            "mlx_lm": kernels(plain, batch, 64),
        }
    return row


async def engine_kernels(engine, prompts, tokens: int) -> dict:
    """CUDA kernels a loop step of one engine run, and how many of its steps were compiled."""
    from ..bench_engine import run_engine
    from .bench_decode_step import kernel_summary, profile_kernels

    totals = collections.Counter()
    with timers(totals), profile_kernels() as prof:
        await run_engine(engine, prompts, tokens)
    steps = totals["loop.step calls"]
    return {**kernel_summary(prof, steps), "steps": steps, "compiled_steps": totals["compiled_call calls"]}


async def main_async(args) -> dict:
    import mlx.core as mx

    from engine.compiled_step import select_column
    from engine.config import EngineConfig
    from engine.engine import AsyncEngine

    from ..report import mlx_machine

    config = EngineConfig(max_num_seqs=max(args.batches), prefill_batch_size=8, paged_cache=True)
    engine = AsyncEngine.from_source(args.model, config)
    write = "select" if select_column(config.decode_column_write) else "slice"
    try:
        rows = [await measure(engine, engine.loaded.model, b, args, write) for b in args.batches]
    finally:
        engine.shutdown()
    return {
        "machine": mlx_machine(),
        "device": str(mx.default_device()),
        "model": args.model,
        "tokens": args.tokens,
        "ragged": args.ragged,
        "column_write": write,
        "rows": rows,
    }


LABELS = ["loop.step", "launch + wait", "issue_decode", "compiled_call", "decode_copies", "read", "on_token", "deliver"]


def table(doc: dict) -> str:
    prompts = "ragged prompts (32–47 tokens)" if doc.get("ragged") else "32-token prompts"
    lines = [
        f"{doc['device']}, {doc['model']}, {prompts}, {doc['tokens']} tokens a request; ms a step, per round",
        "",
        "| batch | engine | compiled steps | bare loop | mlx_lm loop | " + " | ".join(LABELS) + " |",
        "|---:" * (5 + len(LABELS)) + "|",
    ]
    for row in doc["rows"]:
        for r in row["rounds"]:
            lines.append(
                f"| {row['batch']} | {r['engine_ms_per_step']} ({r['engine_tok_s']:.0f} tok/s) "
                f"| {r['compiled_steps']} / {r['steps']} | {r['bare_ms_per_step']} "
                f"| {r['mlx_lm_ms_per_step']} | " + " | ".join(f"{r['ms'].get(k, 0.0):.2f}" for k in LABELS) + " |"
            )
    if "kernels" in doc["rows"][0]:
        lines += [
            "",
            "| batch | engine kernels/step (device ms; compiled steps) | bare loop | mlx_lm loop |",
            "|---:|---:|---:|---:|",
        ]
        for row in doc["rows"]:
            k = row["kernels"]
            lines.append(
                f"| {row['batch']} | {k['engine']['kernels_per_step']} ({k['engine']['device_ms_per_step']}; "
                f"{k['engine']['compiled_steps']} / {k['engine']['steps']}) | "
                + " | ".join(f"{k[v]['kernels_per_step']} ({k[v]['device_ms_per_step']})" for v in ("bare", "mlx_lm"))
                + " |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="synthetic:qwen3-0.6b-8bit")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 5, 16])
    parser.add_argument("--tokens", type=int, default=256, help="new tokens per request (and bare-loop steps)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ragged", action="store_true", help="prompts of 32–47 tokens, so decode batches are padded")
    parser.add_argument(
        "--kernels",
        action="store_true",
        help="also count CUDA kernels a step, through the engine and the bare loops (needs torch)",
    )
    parser.add_argument("--json-out")
    args = parser.parse_args()
    doc = asyncio.run(main_async(args))
    emit(doc, table(doc), args.json_out)


if __name__ == "__main__":
    main()
