"""Load time, prefill and decode speed of the bundled models: stock quantized path vs fast CPU path.

    python -m benchmarks load [--models NAME ...] [--prefill-tokens 512] [--decode-tokens 32]
                                    [--quick] [--json-out PATH]

Each (model, path) runs in its own child process, because OpenBLAS must be preloaded before MLX:
  stock  load_model(source, fast_cpu=False), no LD_PRELOAD: weights as mlx_lm gets them from the
         MLX export (SmolLM2 4-bit; Gemma's K-quant export is float32 already), reference BLAS.
  fast   load_model(source, fast_cpu=True) with engine.loading.cpu_fast_path.openblas_env() applied.
The parent loads every model once first so the GGUF -> MLX export is cached; "load s" is then the
child's LoadedModel.load_seconds. Prefill is timed the way mlx_lm's generate_step does it: the
prompt goes through the model with a prompt cache, the cache is evaluated, and the logits of the
last position are evaluated (not logits for all 512 positions). Decode is a plain greedy loop at
batch 1. When a path is so slow that the prefill would exceed --prefill-budget-s (estimated from
the warm-up), its prompt is shortened and the output says so. Prints one JSON document, then a
markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time

from benchmarks.report import emit

PATHS = ("stock", "fast")
TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1969, Apollo 11 landed on the Moon; "
    "Neil Armstrong stepped out at 02:56 UTC. def fib(n): return n if n < 2 else fib(n-1) + fib(n-2). "
    "Les élèves étudient la photosynthèse, die Zellteilung und el ciclo del agua. "
    "Prices rose 3.7% in March while the committee debated whether interest rates should move. "
)


# --- child: one model, one path ---------------------------------------------------------------


def build_prompt(tokenizer, n_tokens: int) -> list[int]:
    text, ids = TEXT, []
    while len(ids) < n_tokens:
        text += TEXT
        ids = tokenizer.encode(text)
    return ids[:n_tokens]


def prefill(model, ids):
    """Prompt through the model with a fresh cache; returns last-position logits and the cache."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    prompt = mx.array(ids)[None]
    if prompt.shape[1] > 1:
        model(prompt[:, :-1], cache=cache)
        mx.eval([c.state for c in cache])
    logits = model(prompt[:, -1:], cache=cache)[:, -1, :]
    mx.eval(logits)
    return logits, cache


def decode(model, logits, cache, n_tokens: int) -> None:
    import mlx.core as mx

    y = mx.argmax(logits, axis=-1)
    for _ in range(n_tokens):
        logits = model(y[:, None], cache=cache)[:, -1, :]
        y = mx.argmax(logits, axis=-1)
        mx.eval(y)


def run_child(args) -> dict:
    import mlx.core as mx
    import mlx_lm  # noqa: F401 - imported before the timer so load_seconds excludes it
    import mlx_lm.models.cache  # noqa: F401 - imported before the timer, as the line above

    from engine.loading import cpu_fast_path
    from engine.loading.loader import load_model
    from engine.loading.sources import BUNDLED

    loaded = load_model(BUNDLED[args.model], fast_cpu=args.path == "fast")
    model, notes = loaded.model, []
    ids = build_prompt(loaded.tokenizer, args.prefill_tokens)

    # Warm-up on a short prompt; its speed also estimates how long the full prefill will take.
    warm = ids[:32]
    t0 = time.perf_counter()
    logits, cache = prefill(model, warm)
    warm_tps = len(warm) / (time.perf_counter() - t0)
    decode(model, logits, cache, 2)
    if len(ids) / warm_tps > args.prefill_budget_s:
        n = max(32, int(args.prefill_budget_s * warm_tps) // 32 * 32)
        notes.append(
            f"prefill shortened from {len(ids)} to {n} tokens: warm-up ran at {warm_tps:.1f} tok/s, "
            f"{len(ids)} tokens would take ~{len(ids) / warm_tps:.0f}s > budget {args.prefill_budget_s:.0f}s"
        )
        ids = ids[:n]

    t0 = time.perf_counter()
    logits, cache = prefill(model, ids)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    decode(model, logits, cache, args.decode_tokens)
    decode_s = time.perf_counter() - t0

    summary = loaded.summary()
    return {
        "model": args.model,
        "path": args.path,
        "dtype": summary["dtype"],
        "weights_bytes": summary["weights_bytes"],
        "load_s": round(loaded.load_seconds, 3),
        "prefill_tokens": len(ids),
        "prefill_s": round(prefill_s, 3),
        "prefill_tok_s": round(len(ids) / prefill_s, 2),
        "decode_tokens": args.decode_tokens,
        "decode_s": round(decode_s, 3),
        "decode_tok_s": round(args.decode_tokens / decode_s, 2),
        "openblas_loaded": cpu_fast_path.openblas_loaded(),
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "mlx_device": str(mx.default_device()),
        "notes": notes,
    }


# --- parent: orchestration and report ---------------------------------------------------------


def child_env(path: str) -> dict[str, str]:
    from engine.loading import cpu_fast_path

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if path == "fast":
        env.update(cpu_fast_path.openblas_env())
    return env


def run_one(model: str, path: str, args) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_load",
        "--child",
        "--model",
        model,
        "--path",
        path,
        "--prefill-tokens",
        str(args.prefill_tokens),
        "--decode-tokens",
        str(args.decode_tokens),
        "--prefill-budget-s",
        str(args.prefill_budget_s),
    ]
    print(f"[bench] {model} / {path} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=child_env(path), capture_output=True, text=True, timeout=args.child_timeout_s)
    except subprocess.TimeoutExpired:
        return {"model": model, "path": path, "error": f"timed out after {args.child_timeout_s}s"}
    if proc.returncode != 0 or not proc.stdout.strip():
        return {"model": model, "path": path, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["child_wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def warm_exports(models: list[str]) -> dict:
    """Load each model once (stock) in the parent so the GGUF -> MLX export is cached for the children."""
    from engine.loading.loader import load_model
    from engine.loading.sources import BUNDLED

    times = {}
    for name in models:
        print(f"[bench] warm-up load (export if not cached): {name}", file=sys.stderr, flush=True)
        times[name] = round(load_model(BUNDLED[name], fast_cpu=False).load_seconds, 3)
    return times


def machine_info() -> dict:
    import mlx.core as mx

    from engine.loading import cpu_fast_path

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "mlx": importlib.metadata.version("mlx"),
        "mlx_lm": importlib.metadata.version("mlx-lm"),
        "mlx_default_device": str(mx.default_device()),
        "openblas": cpu_fast_path.find_openblas(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, "-m", "benchmarks.bench_load", *sys.argv[1:]]),
    }


def table(results: list[dict], models: list[str]) -> str:
    lines = [
        "| model | path | dtype | weights MB | load s | prefill tok/s | decode tok/s |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for model in models:
        rows = {r["path"]: r for r in results if r["model"] == model}
        for path in PATHS:
            r = rows.get(path, {})
            if "error" in r or not r:
                lines.append(f"| {model} | {path} | error | | | | |")
                continue
            prefill = f"{r['prefill_tok_s']:.1f}" + (f" ({r['prefill_tokens']} tok)*" if r["notes"] else "")
            lines.append(
                f"| {model} | {path} | {r['dtype']} | {r['weights_bytes'] / 1e6:.1f} | {r['load_s']:.2f} "
                f"| {prefill} | {r['decode_tok_s']:.1f} |"
            )
        s, f = rows.get("stock", {}), rows.get("fast", {})
        if "prefill_tok_s" in s and "prefill_tok_s" in f:
            lines.append(
                f"| {model} | **fast/stock** | | {f['weights_bytes'] / s['weights_bytes']:.2f}x "
                f"| {f['load_s'] / s['load_s']:.2f}x | {f['prefill_tok_s'] / s['prefill_tok_s']:.1f}x "
                f"| {f['decode_tok_s'] / s['decode_tok_s']:.1f}x |"
            )
    notes = [f"\\* {r['model']} / {r['path']}: {n}" for r in results for n in r.get("notes", [])]
    errors = [f"error {r['model']} / {r['path']}: {r['error']}" for r in results if "error" in r]
    return "\n".join(lines + ([""] + notes if notes else []) + ([""] + errors if errors else []))


def parse_args(argv=None):
    from engine.loading.sources import BUNDLED

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(BUNDLED), choices=list(BUNDLED))
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="prefill 128 tokens instead of 512")
    p.add_argument(
        "--prefill-budget-s",
        type=float,
        default=240.0,
        help="shorten a path's prompt (with a note) when its prefill would take longer than this",
    )
    p.add_argument("--child-timeout-s", type=int, default=900)
    p.add_argument("--json-out", metavar="PATH")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.prefill_tokens = 128
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return 0
    started = time.perf_counter()
    doc = {
        "machine": machine_info(),
        "settings": {
            "prefill_tokens": args.prefill_tokens,
            "decode_tokens": args.decode_tokens,
            "prefill_budget_s": args.prefill_budget_s,
        },
    }
    doc["warmup_load_s"] = warm_exports(args.models)
    doc["results"] = [run_one(m, p, args) for m in args.models for p in PATHS]
    doc["wall_s"] = round(time.perf_counter() - started, 1)
    doc["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]  # other processes skew the numbers
    emit(doc, "\n" + table(doc["results"], args.models), args.json_out)
    return 1 if any("error" in r for r in doc["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
