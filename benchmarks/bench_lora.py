"""LoRA adapters in one continuous batch (issue 37): tok/s and memory of 16 concurrent requests
spread over 1, 4 and 8 adapters, against 16 on the base alone and against the same fine-tunes
served as separate fused models.

    python -m benchmarks lora                                  # SmolLM2, 8 adapters, 16 clients
    python -m benchmarks lora --max-tokens 16 --rounds 2 --out docs/results/bench_lora_cpu.json
    python -m benchmarks lora --step-ab      # one decode forward, base vs 8 adapters, interleaved pairs

Adapters are made here, in mlx_lm's format (`mlx_lm.lora`'s layers on every layer's q, v, o and
down projections, rank `--rank`, random non-zero weights), under a temporary directory.

Each configuration runs in its own process (so its memory is its own), the engine alone:
- `base`: an engine without adapters, the 16 requests on the base;
- `base_on_lora_engine`: the engine with 8 adapters configured, the 16 requests on the base (what
  wrapping the layers costs when no row has an adapter: nothing, by design);
- `lora_k` (k = 1, 4, 8): that engine, the requests spread round-robin over k adapters (loaded by
  a warm-up wave first: the steady state, not the first load);
- `fused_k` (k = 4, 8): k engines, each on a copy of the base with one adapter merged into its
  weights (mlx_lm's fuse: W + scale * (a @ b)^T), all resident together, the requests spread over
  them: separate models, as a server without LoRA batching serves them.

Per configuration: the median tok/s over `--rounds` waves (greedy, `--max-tokens` each, EOS
ignored so every configuration generates the same number of tokens), each wave's, the process's RSS
and MLX's active and peak memory after the waves. Goal (issue 37): `lora_8` at >= 80% of `base`,
memory about the base's plus the adapters'.

Why `mx.gather_mm` and not rows grouped by adapter: grouping needs, every step, the rows sorted by
adapter on the host and one matmul pair per adapter present per module (up to 8 launches instead
of one, and a compiled trace per mix of groups); gather_mm is one pair of launches per module
whatever the mix, with the rows' slots as an array input, so the compiled step is traced once per
batch shape. It was not measured against grouping here.
Timings: take them on a quiet machine (`flock /tmp/orchard-bench.lock ...` on the shared box).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .report import emit, md_table, mlx_machine

MODEL = "smollm2-135m-instruct"
KEYS = ["self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj"]
QUESTIONS = [
    "Write a short story about a dragon.", "Explain how a rainbow forms.", "What is a black hole?",
    "Describe a day at the beach.", "How do bees make honey?", "Why is the sky blue?",
    "Tell me about the moon.", "How does a bicycle work?", "What do cats eat?", "Describe autumn.",
    "How are mountains formed?", "What is photosynthesis?", "Explain gravity to a child.",
    "Write a poem about rain.", "How does a compass work?", "What is a volcano?",
]  # fmt: skip
CONFIGS = ["base", "base_on_lora_engine", "lora_1", "lora_4", "lora_8", "fused_4", "fused_8"]


# --- adapters ------------------------------------------------------------------------------


def make_adapters(root: Path, n: int, rank: int, model: str) -> list[Path]:
    """`n` adapters in mlx_lm's format under `root` (seeded: the same every run)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from engine.loading.loader import load_model

    base = load_model(model).model
    params = {"rank": rank, "scale": 2.0, "dropout": 0.0, "keys": KEYS}
    base.freeze()
    linear_to_lora_layers(base, len(base.layers), params)
    shapes = [(k, v.shape) for k, v in tree_flatten(base.trainable_parameters())]
    config = {"fine_tune_type": "lora", "num_layers": len(base.layers), "lora_parameters": params}
    paths = []
    for i in range(n):
        mx.random.seed(100 + i)
        path = root / f"ft{i}"
        path.mkdir()
        mx.save_safetensors(str(path / "adapters.safetensors"), {k: mx.random.normal(s) * 0.02 for k, s in shapes})
        (path / "adapter_config.json").write_text(json.dumps(config))
        paths.append(path)
    return paths


def fused(loaded, path: Path):
    """A copy of the loaded base (loaded again) with the adapter at `path` merged into its weights."""
    import mlx.core as mx

    from engine.lora import read_adapter

    adapter = read_adapter(path.name, path, loaded.model)
    modules = dict(loaded.model.named_modules())
    for name, (a, b) in adapter.weights.items():
        layer = modules[name]
        layer.weight = layer.weight + (adapter.scale * (a @ b)).T.astype(layer.weight.dtype)
    mx.eval(loaded.model.parameters())
    return loaded


# --- one configuration, in its own process ---------------------------------------------------


def engine_config(args, adapters: list[Path]):
    from engine.config import EngineConfig

    specs = [{"name": p.name, "path": str(p)} for p in adapters]
    return EngineConfig(
        cache_memory_mb=args.cache_mb,
        max_num_seqs=16,
        prefill_step_size=128,
        adapters=specs,
        max_loaded_adapters=max(1, len(specs)),
    )


def make_engines(kind: str, k: int, args, adapters: list[Path]) -> list[tuple[object, str | None]]:
    """The engines of a configuration and, per request slot, (engine, adapter name)."""
    import engine.engine
    from engine.engine import AsyncEngine
    from engine.loading.loader import load_model

    if kind == "fused":
        engines = []
        for path in adapters[:k]:
            model = fused(load_model(args.model), path)
            engine.engine.load_model = lambda source, model=model, **kw: model
            engines.append(AsyncEngine.from_source(args.model, engine_config(args, [])))
        return [(engines[i % k], None) for i in range(16)]
    eng = AsyncEngine.from_source(args.model, engine_config(args, adapters if kind != "base" else []))
    names = [p.name for p in adapters[:k]]
    return [(eng, names[i % k] if names else None) for i in range(16)]


async def wave(slots, max_tokens: int, round_: int) -> dict:
    from engine.request import PromptInput
    from engine.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    async def one(i, eng, adapter):
        question = QUESTIONS[(i + round_) % len(QUESTIONS)]
        prompt = PromptInput(messages=[{"role": "user", "content": question}])
        return sum([len(o.token_ids) async for o in eng.submit(prompt, params, adapter=adapter)])

    for eng in {id(e): e for e, _ in slots}.values():
        eng.clear_cache()
    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i, e, a) for i, (e, a) in enumerate(slots))))
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": round(seconds, 3), "tok_per_s": round(tokens / seconds, 1)}


def parse(name: str) -> tuple[str, int]:
    """A configuration's kind (base, lora, fused) and its number of adapters."""
    if name == "base":
        return "base", 0
    if name == "base_on_lora_engine":
        return "lora", 0
    kind, k = name.split("_")
    return kind, int(k)


def run_one(name: str, args) -> dict:
    """One configuration (in this process): warm-up wave, `rounds` measured waves, memory."""
    import mlx.core as mx
    import psutil

    kind, k = parse(name)
    adapters = sorted(Path(args.adapters).iterdir()) if kind != "base" else []
    slots = make_engines(kind, k, args, adapters)
    asyncio.run(wave(slots, args.max_tokens, -1))
    waves = [asyncio.run(wave(slots, args.max_tokens, r)) for r in range(args.rounds)]
    engines = list({id(e): e for e, _ in slots}.values())
    out = {
        "config": name,
        "engines": len(engines),
        "adapters": k,
        "tok_per_s": statistics.median(w["tok_per_s"] for w in waves),
        "waves": waves,
        "rss_mb": round(psutil.Process().memory_info().rss / 2**20),
        "mlx_active_mb": round(mx.get_active_memory() / 2**20),
        "mlx_peak_mb": round(mx.get_peak_memory() / 2**20),
        "footprint_weights_mb": round(sum(e.footprint.weights for e in engines) / 2**20, 1),
        "adapter_states": {n: s["state"] for e in engines for n, s in e.adapter_states().items()},
    }
    for e in engines:
        e.shutdown()
    return out


# --- one forward pass, base rows vs adapter rows, interleaved ------------------------------------


def step_ab(args) -> dict:
    """The model's decode forward of 16 rows (one token each, at a `--context`-token KV cache), all
    on the base vs spread over 8 adapters, alternated pair by pair (`--pairs`): the ratio of each
    pair cancels the load drift of a shared machine that whole waves do not."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from engine.loading.loader import load_model
    from engine.lora import LoRATable, read_adapter

    model = load_model(args.model, fast_cpu=True if mx.default_device() == mx.cpu else None).model
    with tempfile.TemporaryDirectory() as tmp:
        adapters = [read_adapter(p.name, p, model) for p in make_adapters(Path(tmp), 8, args.rank, args.model)]
    table = LoRATable(model, 8)
    table.attach(sorted(adapters[0].weights), args.rank)
    for i, adapter in enumerate(adapters):
        table.put(i + 1, adapter)
    cache = make_prompt_cache(model)
    mx.eval(model(mx.zeros((16, args.context), dtype=mx.uint32), cache=cache))
    x = mx.zeros((16, 1), dtype=mx.uint32)

    def once(slots: list[int]) -> float:
        start = time.perf_counter()
        with table.applied(LoRATable.slot_array(slots)):
            mx.eval(model(x, cache=cache))
        for c in cache:
            c.offset -= 1  # the same position every time
        return time.perf_counter() - start

    base, mixed = [0] * 16, [1 + i % 8 for i in range(16)]
    for _ in range(5):
        once(base), once(mixed)
    pairs = [(once(base), once(mixed)) for _ in range(args.pairs)]
    return {
        "machine": mlx_machine(),
        "model": args.model,
        "options": {"context": args.context, "pairs": args.pairs, "rank": args.rank},
        "base_ms": round(statistics.median(b for b, _ in pairs) * 1e3, 2),
        "adapters_8_ms": round(statistics.median(m for _, m in pairs) * 1e3, 2),
        "adapters_8_vs_base": round(statistics.median(b / m for b, m in pairs), 3),  # base time / adapter time
    }


# --- the suite -----------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    base = next(r["tok_per_s"] for r in rows if r["config"] == "base")
    head = ["config", "engines", "adapters", "tok/s (median)", "vs base", "waves", "RSS MB", "MLX active MB",
            "MLX peak MB", "weights+slots MB"]  # fmt: skip
    body = [
        [r["config"], r["engines"], r["adapters"], r["tok_per_s"], f"{r['tok_per_s'] / base:.2f}",
         " / ".join(str(w["tok_per_s"]) for w in r["waves"]), r["rss_mb"], r["mlx_active_mb"], r["mlx_peak_mb"],
         r["footprint_weights_mb"]]
        for r in rows
    ]  # fmt: skip
    return md_table(head, body)


def main_all(args) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        print(f"making 8 adapters (rank {args.rank})", file=sys.stderr, flush=True)
        make_adapters(Path(tmp), 8, args.rank, args.model)
        for name in args.configs:
            print(f"{name}: running", file=sys.stderr, flush=True)
            argv = [sys.executable, "-m", "benchmarks.bench_lora", "--one", name, "--adapters", tmp]
            argv += [
                "--max-tokens",
                str(args.max_tokens),
                "--rounds",
                str(args.rounds),
                "--cache-mb",
                str(args.cache_mb),
            ]
            done = subprocess.run(argv, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{name}: {rows[-1]['tok_per_s']} tok/s, RSS {rows[-1]['rss_mb']} MB", file=sys.stderr, flush=True)
    options = {k: v for k, v in vars(args).items() if k not in ("json_out", "one", "adapters")}
    return {"machine": mlx_machine(), "model": args.model, "options": options, "rows": rows}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=MODEL)
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=CONFIGS)
    p.add_argument("--rounds", type=int, default=3, help="measured waves per configuration (median reported)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request (EOS ignored)")
    p.add_argument("--rank", type=int, default=8, help="the adapters' rank")
    p.add_argument("--cache-mb", type=int, default=256, help="the KV budget of each engine (cache_memory_mb)")
    p.add_argument("--step-ab", action="store_true", help="only one decode forward, base vs 8 adapters, interleaved")
    p.add_argument("--context", type=int, default=256, help="--step-ab: the KV cache's length")
    p.add_argument("--pairs", type=int, default=40, help="--step-ab: base / adapters pairs measured")
    p.add_argument("--out", "--json-out", dest="json_out", help="write the JSON here too")
    p.add_argument("--one", help=argparse.SUPPRESS)  # a child: run this configuration, print its JSON
    p.add_argument("--adapters", help=argparse.SUPPRESS)  # a child: where the adapters are
    return p


def main(argv: list[str] | None = None) -> None:
    from engine.loading.cpu_fast_path import reexec_with_openblas

    reexec_with_openblas()
    args = parser().parse_args(argv if argv is not None else sys.argv[1:])
    if args.one:
        print(json.dumps(run_one(args.one, args)), flush=True)
        return
    if args.step_ab:
        doc = step_ab(args)
        row = [doc["base_ms"], doc["adapters_8_ms"], doc["adapters_8_vs_base"]]
        emit(doc, md_table(["base ms", "8 adapters ms", "8 adapters vs base (median of pairs)"], [row]), args.json_out)
        return
    doc = main_all(args)
    emit(doc, table(doc["rows"]), args.json_out)


if __name__ == "__main__":
    main()
