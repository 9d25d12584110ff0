"""Speculative decoding (`engine.speculative`): tok/s with and without, where the answer repeats the
prompt and where it does not, at 1 and 5 clients.

    python -m benchmarks speculative                                  # off vs ngram, SmolLM2
    python -m benchmarks speculative --spec '{"num_draft_tokens": 6}'  # options of every method
    python -m benchmarks speculative --methods off ngram draft --spec '{"draft_model": "..."}'

Two workloads, each a fixed list of distinct prompts (greedy, `--max-tokens`, EOS honoured: the
tokens actually generated are counted):

- edit: "repeat this text exactly", "fix the typos in this paragraph", "copy this list adding a
  period after each item", over eight ~120-180-token passages: the answer mostly copies the prompt
  (`repeat_share`: the share of the output's 4-grams found in its prompt says how much);
- open: short questions asking for a story or an explanation; the answer does not repeat the
  prompt, though a greedy small model's answer may repeat itself (`lookup_share`: the share of the
  output's 4-grams that occurred earlier in prompt or output, all that prompt lookup can find).

One AsyncEngine per method, the same EngineConfig otherwise, all on one loaded model. For each
workload and client count: a warm-up wave on every engine, then `--rounds` rounds, each running
every method in turn (the order rotates each round) on the same wave of `clients` concurrent
requests (prompts differ from round to round). The prefix cache is cleared before every wave, so
no method reuses another's or an earlier round's prefill. Per cell: median tok/s (every round's
too), TTFT p50, acceptance rate and tokens per verifying row-step, the ratio to `off`, and whether
every greedy output was identical to `off`'s (a speedup with other outputs would be a bug).
Timings: take them on a quiet machine (`flock /tmp/orchard-bench.lock ...` on the shared box).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import statistics
import sys
import time

from .report import emit, md_table, mlx_machine

MODEL = "smollm2-135m-instruct"

PASSAGES = [
    "The Riverside community garden opens every Saturday at eight in the morning. Volunteers water the "
    "vegetable beds, turn the compost and repair the fences. Children can plant sunflowers in the corner "
    "plot near the gate. Tools are kept in the green shed, and the key hangs on a hook inside the office. "
    "Please return every tool clean and dry, and write your name in the logbook before you leave.",
    "Our new kettle boils a full litre of water in under three minutes. It has a stainless steel body, a "
    "removable filter and an automatic shut-off that switches it off when the water boils or when the "
    "kettle is lifted from its base. The handle stays cool to the touch. Descale it once a month with "
    "white vinegar, rinse it twice, and never immerse the base in water.",
    "At the meeting on Tuesday the team agreed to move the product launch to the first week of March. "
    "Maria will update the website and the press kit. Tom will confirm the booking of the conference "
    "hall and order the printed brochures. The budget for advertising stays the same, but half of it "
    "will go to online campaigns. The next meeting is on Friday at ten o'clock in room four.",
    "To make the bread, mix five hundred grams of flour with a teaspoon of salt and a packet of dried "
    "yeast. Add three hundred millilitres of warm water and knead the dough for ten minutes until it is "
    "smooth. Leave it covered in a warm place for one hour. Shape it into a loaf, let it rise for "
    "another thirty minutes, and bake it at two hundred degrees for forty minutes.",
    "The old lighthouse on the northern cape was built in 1872 from granite blocks carried by boat from "
    "the quarry across the bay. Its lamp was first fuelled by whale oil, then by paraffin, and finally by "
    "electricity. The last keeper left in 1961, when the light was automated. Today the tower is a "
    "museum, and visitors can climb the one hundred and twelve steps to the gallery.",
    "Dear Mr Lewis, thank you for your order of two office chairs and one standing desk. The chairs were "
    "sent today and should arrive within three working days. The desk is out of stock at the moment, and "
    "we expect new deliveries at the end of the month. If you prefer, we can refund the desk now and let "
    "you know when it is available again. Kind regards, the customer service team.",
    "When the application starts, it reads the configuration file from the home directory and checks "
    "that every required field is present. If the file is missing, it creates one with default values "
    "and prints a warning. The log level can be changed with the verbose flag. Errors are written to a "
    "separate file, which is rotated every day and kept for two weeks before it is deleted.",
    "The walking tour starts at the central station and follows the river to the cathedral. After a short "
    "stop at the market square, the group visits the town hall, the old university library and the "
    "botanical garden. Lunch is served at a small restaurant near the bridge. The tour ends at the castle "
    "in the late afternoon, and a bus takes everyone back to the station.",
]

OPEN_QUESTIONS = [
    "Write a short story about a dragon who is afraid of the dark.",
    "Explain how a rainbow forms.",
    "Tell me a story about a robot that learns to paint.",
    "Why do cats purr? Explain in a few paragraphs.",
    "Write a short story about two friends lost in a forest.",
    "Explain how airplanes stay in the air.",
    "Tell me a bedtime story about a sleepy owl.",
    "Explain why the sea is salty.",
    "Write a story about a village where it never stops snowing.",
    "Explain how the heart pumps blood through the body.",
    "Tell me a story about a pirate who hates the sea.",
    "Explain what causes the seasons on Earth.",
]


def add_typos(text: str) -> str:
    """Every fifth word of more than four letters with two inner letters swapped (deterministic)."""
    words = text.split(" ")
    for i in range(2, len(words), 5):
        w = words[i]
        if len(w) > 4 and w.isalpha():
            words[i] = w[0] + w[2] + w[1] + w[3:]
    return " ".join(words)


def as_list(text: str) -> str:
    return "\n".join(f"- {s.strip().rstrip('.')}" for s in text.split(". ") if s.strip())


EDIT_TASKS = [
    lambda p: f"Repeat the following text exactly, without any change:\n\n{p}",
    lambda p: f"Fix the typos in this paragraph and return the corrected paragraph only:\n\n{add_typos(p)}",
    lambda p: f"Copy the list below, adding a period after each item:\n\n{as_list(p)}",
]


def workload_prompts(name: str) -> list[str]:
    """The workload's distinct prompts in a fixed order (edit: every task over every passage, 24)."""
    if name == "open":
        return list(OPEN_QUESTIONS)
    n = len(EDIT_TASKS) * len(PASSAGES)  # 3 and 8 are coprime: i -> (task i % 3, passage i % 8) covers all
    return [EDIT_TASKS[i % len(EDIT_TASKS)](PASSAGES[i % len(PASSAGES)]) for i in range(n)]


def wave_prompts(prompts: list[str], clients: int, round_: int) -> list[str]:
    """Round r's wave: `clients` consecutive prompts from r * clients (round -1: the warm-up, from the end)."""
    start = round_ * clients if round_ >= 0 else len(prompts) - clients
    return [prompts[(start + i) % len(prompts)] for i in range(clients)]


# --- running waves ------------------------------------------------------------------------


def spec_counters(engine) -> dict:
    """The engine's speculation counters (the loop is idle between waves), zeros without speculation."""
    spec = getattr(engine.scheduler.gen, "spec", None)
    if spec is None:
        return {"verify_steps": 0, "drafting_rows": 0, "drafted": 0, "accepted": 0, "emitted": 0, "rows": 0}
    return dataclasses.asdict(spec.counters)


def prompt_input(engine, text: str):
    """A user's chat turn; the text as it is for a base model (a synthetic one, on a GPU)."""
    from engine.request import PromptInput

    return PromptInput(messages=[{"role": "user", "content": text}]) if engine.template else PromptInput(text=text)


async def run_wave(engine, prompts: list[str], max_tokens: int) -> dict:
    """`prompts` submitted together, run to completion: tok/s, TTFTs, each output's token ids, and
    what speculation did meanwhile."""
    from engine.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)

    async def one(text: str):
        start = time.perf_counter()
        ttft, ids = None, []
        async for out in engine.submit(prompt_input(engine, text), params):
            if out.token_ids and ttft is None:
                ttft = time.perf_counter() - start
            ids += out.token_ids
        return ttft if ttft is not None else time.perf_counter() - start, ids

    engine.clear_cache()  # queued before the requests: every wave prefills from scratch
    before = spec_counters(engine)
    engine.step_log = collections.deque()
    start = time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - start
    after = spec_counters(engine)
    steps, engine.step_log = list(engine.step_log), None
    tokens = sum(len(ids) for _, ids in results)
    return {
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tok_per_s": round(tokens / wall, 2),
        "ttft_ms": [round(t * 1000, 1) for t, _ in results],
        "outputs": [ids for _, ids in results],
        "spec": {k: after[k] - before[k] for k in after},
        "steps": step_summary(steps),
    }


def step_summary(steps: list[tuple]) -> dict:
    """The engine's steps in a wave (its step log: start, seconds, streams, outputs, compiled traces
    so far): how many, their median and total ms, and the compiled-decode traces made meanwhile."""
    if not steps:
        return {"steps": 0}
    ms = [1000 * s[1] for s in steps]
    return {
        "steps": len(steps),
        "median_ms": round(statistics.median(ms), 2),
        "total_ms": round(sum(ms), 1),
        "traces": steps[-1][4] - steps[0][4],
    }


def repeat_share(prompt_ids: list[int], output: list[int], n: int = 4) -> float | None:
    """Share of the output's n-grams that occur in the prompt (None for outputs shorter than n)."""
    seen = {tuple(prompt_ids[i : i + n]) for i in range(len(prompt_ids) - n + 1)}
    grams = [tuple(output[i : i + n]) for i in range(len(output) - n + 1)]
    return sum(g in seen for g in grams) / len(grams) if grams else None


def lookup_share(prompt_ids: list[int], output: list[int], n: int = 4) -> float | None:
    """Share of the output's n-grams that already occurred earlier in prompt + output: what prompt
    lookup can find at all (a greedy small model's open-ended answer repeats itself too)."""
    seq = prompt_ids + output
    seen = {tuple(seq[i : i + n]) for i in range(len(prompt_ids) - n + 1)}
    hits = total = 0
    for end in range(max(len(prompt_ids), n), len(seq)):
        gram = tuple(seq[end - n + 1 : end + 1])
        hits, total = hits + (gram in seen), total + 1
        seen.add(gram)
    return hits / total if total else None


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where two outputs differ (None: identical)."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# --- one cell: workload x clients x method ------------------------------------------------


def cell(workload: str, clients: int, method: str, runs: list[dict], reference: list[dict] | None, codec) -> dict:
    """A method's rounds summed up; `reference`: off's rounds (same prompts), for the identity check;
    `codec`: (prompt text -> its token ids, token ids -> text)."""
    encode, decode = codec
    spec = {k: sum(r["spec"][k] for r in runs) for k in runs[0]["spec"]}
    rates = [r["tok_per_s"] for r in runs]
    outputs = [ids for r in runs for ids in r["outputs"]]
    prompts = [encode(p) for r in runs for p in r["texts"]]
    shares = [s for p, ids in zip(prompts, outputs) if (s := repeat_share(p, ids)) is not None]
    lookups = [s for p, ids in zip(prompts, outputs) if (s := lookup_share(p, ids)) is not None]
    row = {
        "workload": workload,
        "clients": clients,
        "method": method,
        "tok_per_s": statistics.median(rates),
        "tok_per_s_rounds": rates,
        "ttft_p50_ms": statistics.median(t for r in runs for t in r["ttft_ms"]),
        "tokens_per_request": round(len([t for ids in outputs for t in ids]) / len(outputs), 1),
        "repeat_share": round(statistics.mean(shares), 3) if shares else None,
        "lookup_share": round(statistics.mean(lookups), 3) if lookups else None,
        "verify_steps": spec["verify_steps"],
        "drafted_tokens": spec["drafted"],
        "accepted_tokens": spec["accepted"],
        "acceptance_rate": round(spec["accepted"] / spec["drafted"], 4) if spec["drafted"] else None,
        # tokens a drafting row got from one forward pass (1 without speculation), as the engine counts
        "tokens_per_step": round(1 + spec["accepted"] / spec["drafting_rows"], 3) if spec["drafting_rows"] else None,
        "steps": sum(r["steps"]["steps"] for r in runs),
        "step_median_ms": statistics.median(r["steps"].get("median_ms", 0) for r in runs),
        "step_ms_share": round(
            sum(r["steps"].get("total_ms", 0) for r in runs) / (10 * sum(r["wall_s"] for r in runs)), 1
        ),
        "traces": sum(r["steps"].get("traces", 0) for r in runs),
        "sample_output": decode(outputs[0])[:600],
        "rounds": [{k: v for k, v in r.items() if k not in ("outputs", "texts")} for r in runs],
    }
    if reference is not None:
        ref = [ids for r in reference for ids in r["outputs"]]
        diffs = [first_difference(a, b) for a, b in zip(ref, outputs)]
        row["identical"] = all(d is None for d in diffs)
        row["identical_requests"] = f"{sum(d is None for d in diffs)}/{len(diffs)}"
        row["first_differences"] = diffs
    return row


async def measure(engines: dict, workload: str, clients: int, args) -> list[dict]:
    """Warm-up, then `args.rounds` rounds of every method (rotating order) on the same waves."""
    prompts = workload_prompts(workload)
    methods = list(engines)
    for engine in engines.values():  # traces and shapes of this batch size first
        await run_wave(engine, wave_prompts(prompts, clients, -1), args.max_tokens)
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for r in range(args.rounds):
        wave = wave_prompts(prompts, clients, r)
        for m in methods[r % len(methods) :] + methods[: r % len(methods)]:
            run = await run_wave(engines[m], wave, args.max_tokens)
            runs[m].append({"round": r, "prompts": [prompts.index(t) for t in wave], "texts": wave, **run})
            s = run["spec"]
            print(
                f"{workload} x{clients} round {r} {m}: {run['tok_per_s']} tok/s, {run['tokens']} tokens, "
                f"accepted {s['accepted']}/{s['drafted']}",
                file=sys.stderr,
                flush=True,
            )

    any_engine = next(iter(engines.values()))
    codec = (
        lambda text: any_engine.encode(prompt_input(any_engine, text)),
        any_engine.tokenizer.decode,
    )
    reference = runs.get("off")
    rows = [cell(workload, clients, m, runs[m], reference if m != "off" else None, codec) for m in methods]
    base = next((row for row in rows if row["method"] == "off"), None)
    for row in rows:  # median over rounds of each, and each round's ratio (the same wave)
        row["vs_off"] = round(row["tok_per_s"] / base["tok_per_s"], 3) if base else None
        if base is not None:
            row["vs_off_rounds"] = [round(a / b, 3) for a, b in zip(row["tok_per_s_rounds"], base["tok_per_s_rounds"])]
    return rows


# --- engines ------------------------------------------------------------------------------


def share_loaded_model():
    """Engines built from now on load each model once (as tests/conftest.py's `load_once`): the
    engines of the methods run one loaded model, so they differ only in their config."""
    import engine.engine
    from engine.loading.loader import memoized

    engine.engine.load_model = memoized(engine.engine.load_model)


def make_engines(args) -> dict:
    from engine.config import EngineConfig
    from engine.engine import AsyncEngine

    share_loaded_model()
    engines = {}
    for m in args.methods:
        spec = {} if m == "off" else {"method": m, **args.spec}
        config = EngineConfig(cache_memory_mb=args.cache_mb, max_num_seqs=max(args.clients), speculative=spec)
        engines[m] = AsyncEngine.from_source(args.model, config)
        print(f"engine {m}: speculative {engines[m].config.speculative.model_dump()}", file=sys.stderr, flush=True)
    return engines


def vs_off(row: dict) -> str:
    """The ratio of the medians, and each round's ratio."""
    if row["vs_off"] is None:
        return "-"
    return f"{row['vs_off']:.3f} (" + " / ".join(f"{x:.2f}" for x in row["vs_off_rounds"]) + ")"


def table(rows: list[dict]) -> str:
    head = ["workload", "clients", "method", "tok/s (median)", "rounds", "vs off (rounds)", "TTFT p50 ms",
            "tokens/req", "acceptance", "tokens/step", "verify steps", "steps", "step p50 ms", "traces", "identical", "repeat share", "lookup share"]  # fmt: skip
    body = [
        [r["workload"], r["clients"], r["method"], r["tok_per_s"], " / ".join(str(t) for t in r["tok_per_s_rounds"]),
         vs_off(r), r["ttft_p50_ms"], r["tokens_per_request"], r["acceptance_rate"], r["tokens_per_step"],
         r["verify_steps"], r["steps"], r["step_median_ms"], r["traces"], r.get("identical_requests", "-"), r["repeat_share"], r["lookup_share"]]
        for r in rows
    ]  # fmt: skip
    return md_table(head, body)


async def main_async(args) -> dict:
    engines = make_engines(args)
    try:
        rows = [
            row
            for workload in args.workloads
            for clients in args.clients
            for row in await measure(engines, workload, clients, args)
        ]
        final = {m: e.stats().get("speculative") for m, e in engines.items()}
        info = next(iter(engines.values())).info
        configs = {m: e.config.speculative.model_dump() for m, e in engines.items()}
    finally:
        for e in engines.values():
            e.shutdown()
    options = {k: v for k, v in vars(args).items() if k != "json_out"}
    return {"machine": mlx_machine(), "model": info, "options": options, "speculative": configs,
            "rows": rows, "engine_stats": final}  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=MODEL)
    p.add_argument("--methods", nargs="+", default=["off", "ngram"], help="`off` (the reference) and/or methods")
    p.add_argument("--spec", type=json.loads, default={}, help="JSON: speculative options of every method")
    p.add_argument("--workloads", nargs="+", choices=["edit", "open"], default=["edit", "open"])
    p.add_argument("--clients", nargs="+", type=int, default=[1, 5])
    p.add_argument("--rounds", type=int, default=3, help="measured waves per cell (median reported)")
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens per request (EOS honoured)")
    p.add_argument("--cache-mb", type=int, default=256, help="the KV budget (cache_memory_mb)")
    p.add_argument("--out", "--json-out", dest="json_out", help="write the JSON here too")
    return p


def main(argv: list[str] | None = None) -> None:
    from engine.loading.cpu_fast_path import reexec_with_openblas

    reexec_with_openblas()
    args = parser().parse_args(argv if argv is not None else sys.argv[1:])
    doc = asyncio.run(main_async(args))
    emit(doc, table(doc["rows"]), args.json_out)


if __name__ == "__main__":
    main()
