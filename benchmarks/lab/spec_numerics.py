"""Does speculation change greedy outputs beyond what batching alone changes?

    python -m benchmarks.lab.spec_numerics                                  # synthetic Qwen3-0.6B, on the GPU machine
    python -m benchmarks.lab.spec_numerics --model smollm2-135m-instruct    # float32 on the CPU: no difference expected

On an H100 (bf16), prompt-lookup speculation gave 2 of 15 open-ended greedy outputs that differed
from the same engine without it, while on the CPU (float32) all were identical. A verify step runs
the multi-token chunk kernels where a plain step runs the one-token decode kernels; with near-tied
logits, another kernel's rounding can flip an argmax. If that is all, batching should flip outputs
the same way: its decode steps run other matmul shapes than a request's alone.

The same greedy prompts (bench_speculative's open and edit workloads, EOS honoured) run through the
real AsyncEngine in four modes: no speculation one prompt at a time (off-alone), no speculation in
waves of `--clients` (off-batch), and the same two with `--method` speculation (ngram-alone,
ngram-batch). Two engines (off, the method) share one loaded model and one config otherwise; the
prefix cache is cleared before every wave. For each pair of modes: the outputs that differ and
where; and, for each difference, the *margin* there: the prompt and the reference mode's output up
to that position go into the reference mode's engine as token ids, and one greedy token comes back
with its top-5 log-probabilities. `gap_top2` is the first minus the second of them, `gap_tokens` the
reference's token minus the other mode's (when that one is in the top 5). A near-tie (a gap of 0 or
a bf16 rounding step, ~0.06 at log-probs near -12) says the two differ by rounding, not by a bug.
The probe is a prefill, so its own argmax (`probe_token`) may pick either token.

Prints a JSON summary (without the outputs) and a table; `--out FILE` writes the JSON with every
output's token ids.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from ..bench_speculative import first_difference, prompt_input, run_wave, share_loaded_model, workload_prompts
from ..report import md_table, mlx_machine, write_json

MODEL = "synthetic:qwen3-0.6b-8bit"
FAST_CPU = {"auto": None, "on": True, "off": False}  # --fast-cpu -> EngineConfig.fast_cpu
# (reference, other, what the pair shows)
PAIRS = [
    ("off-alone", "off-batch", "batching"),
    ("off-alone", "spec-alone", "speculation alone"),
    ("off-batch", "spec-batch", "speculation in a batch"),
    ("off-alone", "spec-batch", "both"),
]


def make_engines(args) -> dict:
    """`off` and `spec`: one loaded model, the same config but for `speculative`."""
    from engine.config import EngineConfig
    from engine.engine import AsyncEngine

    share_loaded_model()
    engines = {}
    for name, spec in [("off", {}), ("spec", {"method": args.method, **args.spec})]:
        config = EngineConfig(
            cache_memory_mb=args.cache_mb, max_num_seqs=args.clients, speculative=spec, fast_cpu=FAST_CPU[args.fast_cpu]
        )
        engines[name] = AsyncEngine.from_source(args.model, config)
        print(f"engine {name}: speculative {engines[name].config.speculative.model_dump()}", file=sys.stderr)
    return engines


async def run_mode(engine, texts: list[str], wave: int, max_tokens: int, name: str) -> dict:
    """Every prompt's greedy output, the prompts submitted `wave` at a time (1: each alone)."""
    outputs, spec, start = [], {}, time.perf_counter()
    for i in range(0, len(texts), wave):
        run = await run_wave(engine, texts[i : i + wave], max_tokens)
        outputs += run["outputs"]
        spec = {k: spec.get(k, 0) + v for k, v in run["spec"].items()}
        print(f"{name}: {i + len(run['outputs'])}/{len(texts)} prompts", file=sys.stderr, flush=True)
    wall = time.perf_counter() - start
    tokens = sum(map(len, outputs))
    return {"wall_s": round(wall, 2), "tokens": tokens, "tok_per_s": round(tokens / wall, 2),
            "drafted": spec["drafted"], "accepted": spec["accepted"], "outputs": outputs}  # fmt: skip


async def probe(engine, ids: list[int], ref: int, other: int | None) -> dict:
    """One greedy token after `ids` (token ids, no template) with its top-5 log-probabilities."""
    from engine.request import PromptInput
    from engine.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=True, top_logprobs=5)
    engine.clear_cache()
    entries = []
    async for out in engine.submit(PromptInput(token_ids=ids), params):
        entries += out.logprobs or []
    top = {t: lp for t, _, lp in entries[0]["top"]}
    lps = sorted(top.values(), reverse=True)
    return {
        "probe_token": entries[0]["id"],
        "gap_top2": round(lps[0] - lps[1], 4),
        "gap_tokens": round(top[ref] - top[other], 4) if ref in top and other in top else None,
        "top5": [[t, text, round(lp, 4)] for t, text, lp in entries[0]["top"]],
    }


async def compare(engines: dict, modes: dict, prompts: list[dict], pair: tuple[str, str, str]) -> dict:
    """The outputs of two modes side by side, and the reference's margin where they first differ."""
    ref_name, other_name, shows = pair
    ref_engine = engines[ref_name.split("-")[0]]
    decode = ref_engine.tokenizer.decode
    diffs = []
    for i, (p, a, b) in enumerate(zip(prompts, modes[ref_name]["outputs"], modes[other_name]["outputs"])):
        pos = first_difference(a, b)
        if pos is None:
            continue
        ref = a[pos] if pos < len(a) else None  # None: one output ended (EOS) where the other went on
        other = b[pos] if pos < len(b) else None
        d = {"prompt": i, "workload": p["workload"], "position": pos, "ref_token": ref, "other_token": other,
             "ref_text": decode([ref]) if ref is not None else None,
             "other_text": decode([other]) if other is not None else None}  # fmt: skip
        diffs.append(d | await probe(ref_engine, p["ids"] + a[:pos], ref, other))
    return {"ref": ref_name, "other": other_name, "shows": shows, "differ": len(diffs), "of": len(prompts),
            "positions": [d["position"] for d in diffs], "diffs": diffs}  # fmt: skip


async def main_async(args) -> dict:
    engines = make_engines(args)
    try:
        any_engine = engines["off"]
        prompts = [
            {"workload": w, "index": j, "text": t, "ids": any_engine.encode(prompt_input(any_engine, t))}
            for w in args.workloads
            for j, t in enumerate(workload_prompts(w)[: args.limit])
        ]
        texts = [p["text"] for p in prompts]
        modes = {}
        for name in ["off", "spec"]:
            for how, wave in [("alone", 1), ("batch", args.clients)]:
                mode = f"{name}-{how}"
                modes[mode] = await run_mode(engines[name], texts, wave, args.max_tokens, mode)
        pairs = [await compare(engines, modes, prompts, pair) for pair in PAIRS]
        info = any_engine.info
    finally:
        for e in engines.values():
            e.shutdown()
    options = {k: v for k, v in vars(args).items() if k != "out"}
    prompts = [{k: p[k] for k in ("workload", "index")} for p in prompts]
    return {"machine": mlx_machine(), "model": info, "options": options, "prompts": prompts,
            "modes": modes, "pairs": pairs}  # fmt: skip


def summary(doc: dict) -> dict:
    """The document without the outputs' token ids."""
    modes = {m: {k: v for k, v in r.items() if k != "outputs"} for m, r in doc["modes"].items()}
    return {**doc, "modes": modes}


def table(doc: dict) -> str:
    def margins(pair: dict) -> str:
        return ", ".join(str(d["gap_top2"]) for d in pair["diffs"]) or "-"

    head = ["reference", "other", "shows", "differ", "first differences", "top-2 gap there (log-prob)"]
    body = [[p["ref"], p["other"], p["shows"], f"{p['differ']}/{p['of']}", str(p["positions"]) if p["positions"] else "-",
             margins(p)] for p in doc["pairs"]]  # fmt: skip
    modes = md_table(
        ["mode", "tokens", "tok/s", "drafted", "accepted"],
        [[m, r["tokens"], r["tok_per_s"], r["drafted"], r["accepted"]] for m, r in doc["modes"].items()],
    )
    return modes + "\n\n" + md_table(head, body)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=MODEL)
    p.add_argument("--method", default="ngram", help="the speculative method of the spec modes")
    p.add_argument("--spec", type=json.loads, default={}, help="JSON: more speculative options")
    p.add_argument("--workloads", nargs="+", choices=["open", "edit"], default=["open", "edit"])
    p.add_argument("--limit", type=int, default=None, help="the first N prompts of each workload only")
    p.add_argument("--clients", type=int, default=5, help="prompts per wave in the batch modes")
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens per request (EOS honoured)")
    p.add_argument("--cache-mb", type=int, default=256, help="the KV budget (cache_memory_mb)")
    p.add_argument(
        "--fast-cpu",
        choices=["auto", "on", "off"],
        default="auto",
        help="EngineConfig.fast_cpu: on, off (the model's own dtype on the CPU) or auto (the default)",
    )
    p.add_argument("--out", help="write the JSON, with every output's token ids, here")
    return p


def main(argv: list[str] | None = None) -> None:
    from engine.loading.cpu_fast_path import reexec_with_openblas

    reexec_with_openblas()
    args = parser().parse_args(argv if argv is not None else sys.argv[1:])
    doc = asyncio.run(main_async(args))
    print(json.dumps(summary(doc), indent=2))
    print(table(doc))
    if args.out:
        write_json(doc, args.out)


if __name__ == "__main__":
    main()
