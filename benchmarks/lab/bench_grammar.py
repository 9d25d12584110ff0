"""Grammar engines for structured output (JSON schema / json_object / forced tool calls), measured.

    python -m benchmarks.lab.bench_grammar [--tokenizer DIR] [--stress-tokenizer DIR | --no-stress]
        [--reps 5] [--batch-steps 48] [--compile-timeout-s 90] [--quick] [--json-out PATH]

Candidates: llguidance (a dependency) and outlines-core (installed only for this benchmark).
xgrammar is not run: its package imports torch at module level (see EXCLUDED).

For each tokenizer (default: the SmolLM2-135M MLX export, vocab 49k; stress case: Gemma-3-270m,
vocab 262k) and each of SCHEMAS (10 JSON schemas + json_object):
1. compile: schema -> the engine's reusable object, first and second time (neither engine caches
   across calls: the second time shows warm-up effects only). llguidance: grammar_from_json_schema
   + LLMatcher(); outlines-core: build_regex_from_schema + Index(regex, vocabulary).
   The compiled object is what a server caches per schema: llguidance a template LLMatcher,
   outlines-core the Index.
2. per request: a fresh matcher from the cached object (llguidance: template.deep_copy();
   outlines-core: Guide(index)). Without a cache, llguidance pays its compile per request (~1 ms),
   outlines-core its Index build (0.1 s to many s).
3. per token, along a real path: a valid instance of the schema (hand-written, checked with
   jsonschema) tokenized with the HF tokenizer, walked token by token: next-token mask into an
   int32 bitmask row, check the token's bit, consume it; at the end the EOS bit must be set.
   --reps walks, each with a fresh matcher. Mean and p99 microseconds per token (mask + consume),
   "cold" for the first walk after compile (llguidance builds lexer states lazily; copies of one
   template share them) and "warm" for the later ones.
4. batch of 16 rows (schemas cycled, rows staggered along their paths, a finished row restarts with
   a fresh matcher): llguidance's LLExecutor (fill_next_token_bitmask_par / consume_token_par,
   default threads and os.cpu_count() threads) against a sequential loop over an identical set of
   16 states (masks compared); outlines-core sequential for reference.
5. apply_bitmask (below): a [B, vocab/32] int32 bitmask onto [B, vocab] float32 logits in MLX, at
   B = 1 and 16, eager and mx.compile'd, with and without the numpy -> mx.array copy of the mask.

Each engine runs in its own worker process (spawn), schema by schema in alternation, so that a
compile that runs away can be stopped (--compile-timeout-s) and both engines see the same machine
state per schema. The machine may be shared: compare engines by the ratios within one run.

The outlines-core vocabulary is built from the same token bytes llguidance decodes (one
byte-string per token id; special tokens left out, EOS passed separately).

Prints one JSON document, then markdown tables; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

from ..report import emit
from .grammar_schemas import SCHEMAS, check_instances, instance_text
from .grammar_workers import BATCH_ROWS, ENGINES, Worker, dist_version, stats_us

DEFAULT_TOKENIZER = "/tmp/smollm2-f32"
DEFAULT_STRESS_TOKENIZER = "/tmp/gemma-export"


def log(msg: str) -> None:
    print(f"[bench_grammar {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The bitmask helper (the engine will own it): llguidance's mlx helper and outlines-core's use a
# Metal kernel, which does not run on CPU or CUDA builds of MLX.


def apply_bitmask(logits, bitmask):
    """logits [B, V] (any float dtype) masked by bitmask [B, W] int32 (bit j of word w allows token
    32*w + j, as llguidance/xgrammar/outlines-core write it): disallowed tokens become -inf.
    Tokens past 32*W (a model vocab padded beyond the tokenizer's) are disallowed.
    Wrap it in mx.compile in the engine: on CPU the fused version measured 4-6x faster than eager
    (about one argmax over the logits); mx.compile traces once per input shape (1-6 ms here)."""
    import mlx.core as mx

    b, v = logits.shape
    shifts = mx.arange(32, dtype=mx.int32)
    bits = mx.right_shift(bitmask[:, :, None], shifts) & 1  # [B, W, 32]; sign bits fine after & 1
    allowed = bits.reshape(b, -1).astype(mx.bool_)
    n = allowed.shape[1]
    if n > v:
        allowed = allowed[:, :v]
    elif n < v:
        allowed = mx.concatenate([allowed, mx.zeros((b, v - n), dtype=mx.bool_)], axis=1)
    return mx.where(allowed, logits, mx.array(-math.inf, dtype=logits.dtype))


# --------------------------------------------------------------------------------------------
EXCLUDED = [
    {
        "engine": "xgrammar 0.2.9",
        "reason": (
            "not run: the wheel's METADATA requires torch>=1.10, transformers, apache-tvm-ffi and "
            "(Linux x86_64) triton; `import xgrammar` imports torch at module level "
            "(xgrammar/matcher.py: `import torch`, bitmask_dtype = torch.int32; also contrib/hf.py, "
            "testing.py), so no bitmask can be computed without torch. Its C++ core takes any DLPack "
            "int32 array, but only behind that Python package. We do not ship torch or triton."
        ),
    }
]


# --------------------------------------------------------------------------------------------
# apply_bitmask in MLX


def bench_apply_bitmask(vocab: int, batch_sizes: list[int], iters: int) -> list[dict]:
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    words = (vocab + 31) // 32
    compiled = mx.compile(apply_bitmask)
    out = []
    for b in batch_sizes:
        logits_np = rng.standard_normal((b, vocab), dtype=np.float32)
        bm_np = rng.integers(-(2**31), 2**31 - 1, size=(b, words), dtype=np.int64).astype(np.int32)
        bm_np[:, 0] = 0  # a row of mostly-disallowed words next to random ones
        logits = mx.array(logits_np)
        bm = mx.array(bm_np)
        mx.eval(logits, bm)
        # correctness against numpy
        ref = logits_np.copy()
        bits = ((bm_np[:, :, None] >> np.arange(32, dtype=np.int32)) & 1).reshape(b, -1)[:, :vocab]
        ref[bits == 0] = -np.inf
        got = np.array(apply_bitmask(logits, bm))
        t0 = time.perf_counter()
        got_c = np.array(compiled(logits, bm))  # first call of this shape: trace + compile
        compile_first_call_ms = round((time.perf_counter() - t0) * 1e3, 2)
        correct = bool(np.array_equal(got, ref) and np.array_equal(got_c, ref))

        def time_it(fn):
            for _ in range(5):
                fn()
            ns = []
            for _ in range(iters):
                t0 = time.perf_counter_ns()
                fn()
                ns.append(time.perf_counter_ns() - t0)
            return stats_us(ns)

        res = {
            "vocab": vocab,
            "B": b,
            "dtype": "float32",
            "device": str(mx.default_device()),
            "correct": correct,
            "compiled_first_call_ms": compile_first_call_ms,
            # time_it calls each lambda before the loop moves on; the defaults bind this iteration's
            # arrays explicitly
            "eager_us": time_it(lambda lg=logits, m=bm: mx.eval(apply_bitmask(lg, m))),
            "compiled_us": time_it(lambda lg=logits, m=bm: mx.eval(compiled(lg, m))),
            "eager_with_np_copy_us": time_it(lambda lg=logits, m=bm_np: mx.eval(apply_bitmask(lg, mx.array(m)))),
            "reference_argmax_us": time_it(lambda lg=logits: mx.eval(mx.argmax(lg, axis=-1))),
        }
        out.append(res)
    return out


# --------------------------------------------------------------------------------------------


def _geomean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def run_tokenizer(label: str, tok_dir: str, args) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    paths = {name: hf_tok.encode(instance_text(inst), add_special_tokens=False) for name, (_, inst) in SCHEMAS.items()}
    names = list(SCHEMAS)
    if args.quick:
        names = names[:4] + ["json_object"]
    doc: dict = {
        "label": label,
        "dir": tok_dir,
        "vocab": len(hf_tok),
        "eos": hf_tok.eos_token_id,
        "engines": {},
        "schemas": [],
    }
    workers = {}
    for eng in ENGINES:
        log(f"{label}: starting {eng} worker")
        workers[eng] = Worker(eng, tok_dir, start_timeout_s=120)
        doc["engines"][eng] = dict(workers[eng].info)
        log(f"{label}: {eng} ready (tokenizer/vocabulary setup {workers[eng].info['setup_s']}s)")
    try:
        for k, name in enumerate(names):
            order = list(ENGINES) if k % 2 == 0 else list(reversed(ENGINES))
            doc["schemas"].append(schema_entry(workers, order, name, paths[name], args, label))
        if not args.no_batch:
            doc["batch"] = batch_runs(workers, [(n, paths[n]) for n in names], args, label)
    finally:
        for w in workers.values():
            w.close()
    doc["summary"] = summary(doc["schemas"])
    return doc


def schema_entry(workers: dict, order: list[str], name: str, path: list[int], args, label: str) -> dict:
    """One schema through each engine's worker (in `order`), with outlines-core's ratios to llguidance."""
    entry = {"name": name, "tokens": len(path), "text": instance_text(SCHEMAS[name][1])}
    for eng in order:
        reply = workers[eng].request(
            ("schema", name, SCHEMAS[name][0], path, args.reps, args.second_compile_below_s),
            timeout=args.compile_timeout_s,
        )
        entry[eng] = (
            reply[2]
            if reply is not None
            else {"ok": False, "error": f"timeout: compile + walk over {args.compile_timeout_s}s (worker restarted)"}
        )
    lg, oc = entry.get("llguidance", {}), entry.get("outlines_core", {})
    if lg.get("ok") and oc.get("ok"):
        entry["ratio_outlines_over_llg"] = {
            "compile_first": round(oc["compile_first_ms"] / lg["compile_first_ms"], 2),
            **{
                f"{key}_mean": round(oc[f"{key}_us"]["mean"] / lg[f"{key}_us"]["mean"], 2)
                for key in ("per_token", "cold_per_token", "warm_per_token")
            },
            "per_token_p99": round(oc["per_token_us"]["p99"] / lg["per_token_us"]["p99"], 2),
        }
    log(
        f"{label}: {name:16s} ({len(path)} tok) "
        + "  ".join(
            f"{e}: "
            + (
                f"compile {entry[e]['compile_first_ms']:.1f} ms, {entry[e]['cold_per_token_us']['mean']:.1f} cold / "
                f"{entry[e]['warm_per_token_us']['mean']:.1f} warm us/tok"
                if entry[e].get("ok")
                else f"FAILED {entry[e].get('error') or entry[e].get('failures')}"
            )
            for e in ENGINES
        )
    )
    return entry


def batch_runs(workers: dict, rows: list, args, label: str) -> dict:
    """Each engine's batch of BATCH_ROWS rows: one thread, and all cores where there are several."""
    threads: list[int | None] = [None]
    if (os.cpu_count() or 1) > 1:
        threads.append(os.cpu_count())
    out = {}
    for eng in ENGINES:
        log(f"{label}: batch of {BATCH_ROWS} rows, {eng}")
        reply = workers[eng].request(("batch", rows, args.batch_steps, threads), timeout=300)
        out[eng] = reply[1] if reply else {"error": "timeout"}
    return out


def summary(schemas: list[dict]) -> dict:
    """Per engine, geometric means and maxima over the schemas it compiled; the ratios' geomeans."""
    out = {}
    for eng in ENGINES:
        ok = [s[eng] for s in schemas if s.get(eng, {}).get("ok")]
        out[eng] = {
            "schemas_ok": len(ok),
            "schemas": len(schemas),
            "compile_first_ms_geomean": _r(_geomean([r["compile_first_ms"] for r in ok])),
            "compile_first_ms_max": _r(max((r["compile_first_ms"] for r in ok), default=None)),
            **{
                f"{key}_geomean": _r(_geomean([r[field]["mean"] for r in ok]))
                for key, field in (
                    ("new_state_us", "new_state_us"),
                    ("per_token_us_mean", "per_token_us"),
                    ("cold_per_token_us_mean", "cold_per_token_us"),
                    ("warm_per_token_us_mean", "warm_per_token_us"),
                )
            },
            "per_token_us_p99_max": _r(max((r["per_token_us"]["p99"] for r in ok), default=None)),
            "warm_per_token_us_p99_max": _r(max((r["warm_per_token_us"]["p99"] for r in ok), default=None)),
            "first_mask_us_geomean": _r(_geomean([r["first_mask_us"]["mean"] for r in ok])),
        }
    both = [s["ratio_outlines_over_llg"] for s in schemas if "ratio_outlines_over_llg" in s]
    out["ratio_outlines_over_llg_geomean"] = (
        {
            k: _r(_geomean([b[k] for b in both]))
            for k in ("compile_first", "per_token_mean", "per_token_p99", "cold_per_token_mean", "warm_per_token_mean")
        }
        if both
        else None
    )
    return out


def _r(x, nd: int = 2):
    return None if x is None else round(x, nd)


def _fmt(x, nd=1) -> str:
    if x is None:
        return "–"
    if x >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{nd}f}"


def _tok_cell(r: dict) -> str:
    c, w = r["cold_per_token_us"], r["warm_per_token_us"]
    return f"{_fmt(c['mean'])} / {_fmt(w['mean'])} / {_fmt(w['p99'])}"


def _schema_table(t: dict) -> list[str]:
    lines = [
        f"\n### {t['label']} (vocab {t['vocab']:,})\n",
        "µs/token = next-token mask + consume; cold = first walk after compile, warm = later walks "
        "(fresh matcher each: llguidance deep_copy of the cached template, outlines-core Guide(index)).\n",
        "| schema | tokens | llg compile ms 1st / 2nd | oc compile ms 1st / 2nd | llg µs/tok cold / warm / warm p99 "
        "| oc µs/tok cold / warm / warm p99 | oc/llg warm µs/tok |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in t["schemas"]:
        cells = []
        for e in ENGINES:
            r = s.get(e, {})
            if r.get("ok"):
                cells.append(
                    (f"{_fmt(r['compile_first_ms'], 2)} / {_fmt(r.get('compile_second_ms'), 2)}", _tok_cell(r))
                )
            else:
                why = (r.get("error") or str(r.get("failures")) or "failed")[:60].replace("|", "/")
                cells.append((f"FAIL: {why}", "–"))
        ratio = s.get("ratio_outlines_over_llg", {}).get("warm_per_token_mean")
        lines.append(
            f"| {s['name']} | {s['tokens']} | {cells[0][0]} | {cells[1][0]} | {cells[0][1]} | "
            f"{cells[1][1]} | {_fmt(ratio, 2)}× |"
        )
    return lines


def _summary_table(t: dict) -> list[str]:
    sm = t["summary"]
    lines = [
        "",
        "| engine | schemas ok | tokenizer setup s | compile ms geomean / max | new matcher µs | "
        "first mask µs | µs/tok cold (geomean) | µs/tok warm (geomean) | warm p99 (worst schema) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in ENGINES:
        m = sm[e]
        lines.append(
            f"| {e} | {m['schemas_ok']}/{m['schemas']} | {t['engines'][e]['setup_s']} | "
            f"{_fmt(m['compile_first_ms_geomean'], 2)} / {_fmt(m['compile_first_ms_max'], 2)} | "
            f"{_fmt(m['new_state_us_geomean'])} | {_fmt(m['first_mask_us_geomean'])} | "
            f"{_fmt(m['cold_per_token_us_mean_geomean'])} | {_fmt(m['warm_per_token_us_mean_geomean'])} | "
            f"{_fmt(m['warm_per_token_us_p99_max'])} |"
        )
    rg = sm.get("ratio_outlines_over_llg_geomean")
    if rg:
        lines.append(
            f"\noutlines-core / llguidance (geomean over schemas): compile {_fmt(rg['compile_first'], 0)}×, "
            f"µs/token cold {_fmt(rg['cold_per_token_mean'], 2)}×, warm {_fmt(rg['warm_per_token_mean'], 2)}×"
        )
    return lines


def _batch_table(batch: dict) -> list[str]:
    lines = [
        "",
        f"| {BATCH_ROWS} rows, µs per step | mask mean / p99 | consume mean | mask+consume mean |",
        "|---|---:|---:|---:|",
    ]
    for e, br in batch.items():
        for k, v in br.items():
            if isinstance(v, dict) and "mask_us" in v:
                lines.append(
                    f"| {e} {k} | {_fmt(v['mask_us']['mean'])} / {_fmt(v['mask_us']['p99'])} | "
                    f"{_fmt(v['consume_us']['mean'])} | {_fmt(v['step_us']['mean'])} |"
                )
    return lines


def _bitmask_table(rows: list[dict]) -> list[str]:
    lines = [
        "\n### apply_bitmask (MLX, float32 logits)\n",
        "| vocab | B | correct | eager µs mean / p99 | mx.compile(apply_bitmask) µs mean / p99 "
        "| its first call (trace) ms | eager + np→mx copy µs | argmax alone µs (reference) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['vocab']:,} | {r['B']} | {r['correct']} | {_fmt(r['eager_us']['mean'])} / "
            f"{_fmt(r['eager_us']['p99'])} | {_fmt(r['compiled_us']['mean'])} / {_fmt(r['compiled_us']['p99'])} | "
            f"{_fmt(r['compiled_first_call_ms'], 2)} | "
            f"{_fmt(r['eager_with_np_copy_us']['mean'])} | {_fmt(r['reference_argmax_us']['mean'])} |"
        )
    return lines


def render(doc: dict) -> str:
    lines = []
    for t in doc["tokenizers"]:
        lines += _schema_table(t) + _summary_table(t)
        if t.get("batch"):
            lines += _batch_table(t["batch"])
    if doc.get("apply_bitmask"):
        lines += _bitmask_table(doc["apply_bitmask"])
    lines.append("\nExcluded: " + "; ".join(f"{x['engine']}: {x['reason']}" for x in doc["excluded"]))
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="HF tokenizer dir (default: SmolLM2 export)")
    ap.add_argument(
        "--stress-tokenizer",
        default=DEFAULT_STRESS_TOKENIZER,
        help="a large-vocab tokenizer dir (default: Gemma-3-270m export); skipped if missing",
    )
    ap.add_argument("--no-stress", action="store_true")
    ap.add_argument("--reps", type=int, default=5, help="walks per schema and engine, each with a fresh matcher")
    ap.add_argument("--batch-steps", type=int, default=48)
    ap.add_argument("--no-batch", action="store_true")
    ap.add_argument(
        "--compile-timeout-s",
        type=float,
        default=90.0,
        help="per engine and schema (compile twice + walks); the worker is restarted past it",
    )
    ap.add_argument(
        "--second-compile-below-s",
        type=float,
        default=3.0,
        help="compile a second time only if the first took less than this",
    )
    ap.add_argument("--bitmask-iters", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="5 schemas, 2 reps, 16 batch steps, no stress tokenizer")
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.batch_steps, args.no_stress = 2, 16, True
    return args


def tokenizer_dirs(args) -> tuple[list[tuple[str, str]], list[str]]:
    """The tokenizers to run (label, directory), and what was skipped; exits if the first is missing."""
    tok_dirs, skipped = [("SmolLM2-135M", args.tokenizer)], []
    if not args.no_stress:
        if os.path.exists(os.path.join(args.stress_tokenizer, "tokenizer.json")):
            tok_dirs.append(("Gemma-3-270m", args.stress_tokenizer))
        else:
            skipped.append(
                f"stress tokenizer {args.stress_tokenizer} missing "
                "(python -m engine.cli export gemma-3-270m /tmp/gemma-export)"
            )
            log(skipped[-1])
    if not os.path.exists(os.path.join(args.tokenizer, "tokenizer.json")):
        sys.exit(
            f"{args.tokenizer}/tokenizer.json missing: "
            f"python -m engine.cli export smollm2-135m-instruct {args.tokenizer} --dequantize"
        )
    return tok_dirs, skipped


def header(args, argv, skipped: list[str]) -> dict:
    import mlx.core as mx

    return {
        "benchmark": "bench_grammar",
        "command": "python -m benchmarks.lab.bench_grammar " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        },
        "versions": {
            "llguidance": dist_version("llguidance"),
            "outlines_core": dist_version("outlines_core"),
            "mlx": mx.__version__,
            "transformers": dist_version("transformers"),
        },
        "note": (
            "The CPU may be shared with other work: compare engines by the ratios within this run "
            "(schemas alternate engine order). p99 is over reps x tokens per schema (~100-400 samples)."
        ),
        "config": {
            "reps": args.reps,
            "batch_steps": args.batch_steps,
            "batch_rows": BATCH_ROWS,
            "compile_timeout_s": args.compile_timeout_s,
            "quick": args.quick,
            "llguidance_options": "grammar_from_json_schema defaults (flexible whitespace), default slices",
            "outlines_options": "build_regex_from_schema defaults (whitespace [ ]?, max_recursion_depth 3)",
        },
        "schemas": {n: s for n, (s, _) in SCHEMAS.items()},
        "excluded": EXCLUDED,
        "skipped": skipped,
        "tokenizers": [],
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.time()
    check_instances()
    tok_dirs, skipped = tokenizer_dirs(args)
    doc = header(args, argv, skipped)
    for label, d in tok_dirs:
        log(f"tokenizer {label}: {d}")
        doc["tokenizers"].append(run_tokenizer(label, d, args))
    log("apply_bitmask in MLX")
    doc["apply_bitmask"] = []
    for t in doc["tokenizers"]:
        doc["apply_bitmask"] += bench_apply_bitmask(t["vocab"], [1, BATCH_ROWS], args.bitmask_iters)
    doc["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    doc["wall_s"] = round(time.time() - t_start, 1)
    log(f"done in {doc['wall_s']}s")
    emit(doc, render(doc), args.json_out)


if __name__ == "__main__":
    main()
