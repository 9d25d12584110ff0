"""A hybrid model (recurrent state beside attention K/V): our paged cache against mlx_lm's BatchGenerator.

    python -m benchmarks hybrid                                     # tiny synthetic:qwen3_5, on this CPU
    python -m benchmarks hybrid --model synthetic:qwen3.5-0.8b-8bit --out hybrid.json   # GPU

Two engines built the same way but for the cache, each loaded once: ours (`paged_cache: true`:
attention K/V in blocks, each sequence's recurrent state in the batch, snapshots of it on prefix
blocks) and the fallback (`paged_cache: false`: mlx_lm's BatchGenerator, no prefix reuse).
AsyncEngine, token-id prompts, greedy, EOS ignored.

1. A repeated system prompt: `--system-tokens` of system prompt and a distinct 32-token question.
   The first request cold (cache cleared), then `--repeats` requests one after another, each with a
   new question and one new token: TTFT (submit to the first token) cold and warm p50, the warm requests' cached
   tokens, fallback / ours warm. Ours resumes from the last snapshot of the state inside the system
   prompt: one taken every `state_interval` tokens (`--state-interval`; the engine's default unless
   given), so a system prompt shorter than that is computed again.
2. `--clients` requests at once, each the system prompt and its own question, `--new-tokens` each
   (cache cleared first): tok/s, the peak batch (requests running at once) and the KV memory held at
   the peak, both sampled after every engine step. Ours: the blocks in use, the running sequences'
   recurrent states, the state snapshots and any decode working copies (the cache's stats); the
   fallback: mlx_lm's cache bytes (`nbytes`: K/V and states of every sequence it holds). Sequences
   per GB of KV = peak batch / peak bytes (GB = 1e9 bytes); beside it, ours with blocks and states
   only: snapshots and working copies take only room the budget leaves spare (snapshots their own
   share, least recently used out; no working copies when the budget is tight: decode gathers blocks).

`--rounds` rounds, the engines' order alternating, after `--warmup-rounds` unrecorded ones (other
prompts: kernels compile there); the table gives medians, the JSON every round. Progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time

from .probe import after_each_step
from .report import emit, fmt, md_table, mlx_machine

QUESTION_TOKENS = 32
ENGINES = {"ours": True, "fallback": False}  # name -> paged_cache


def prompts(vocab: int, system_tokens: int, questions: int, seed: int) -> tuple[list[int], list[list[int]]]:
    """A system prompt and `questions` distinct questions, random token ids (never 0, the EOS)."""
    rng = random.Random(seed)
    system = [rng.randrange(1, vocab) for _ in range(system_tokens)]
    seen: set[tuple[int, ...]] = set()
    while len(seen) < questions:
        seen.add(tuple(rng.randrange(1, vocab) for _ in range(QUESTION_TOKENS)))
    return system, [list(q) for q in sorted(seen, key=lambda _: rng.random())]


class Probe:
    """Wraps the scheduler's step (on the engine thread): after every step, the requests running
    and the KV bytes held, kept at their peaks."""

    def __init__(self, engine):
        self.sched = engine.scheduler
        self.paged = engine.config.paged_cache
        after_each_step(self.sched, self.sample)
        self.reset()

    def reset(self) -> None:
        self.peak_batch = 0
        self.peak_bytes = 0  # everything held
        # less what takes only room the budget leaves spare: snapshots (their own share, least recently
        # used out) and decode working copies (none when the budget is tight: decode gathers blocks)
        self.peak_needed = 0
        self.at_peak: dict = {}
        self.steps = 0

    def held(self) -> dict:
        """The KV bytes held now, by kind."""
        if not self.paged:
            return {"mlx_lm_cache": self.sched.gen.nbytes}
        c = self.sched.cache.stats()
        return {
            "blocks": c["bytes_used"],
            "states": c.get("state_bytes_per_sequence", 0) * c["live_sequences"],
            "snapshots": c.get("snapshot_bytes", 0),
            "working_copies": c["working_copy_bytes"],
        }

    def sample(self) -> None:
        self.steps += 1
        running = sum(1 for r in self.sched.requests.values() if r.running and r.finish_reason is None)
        self.peak_batch = max(self.peak_batch, running)
        held = self.held()
        total = sum(held.values())
        if total > self.peak_bytes:
            self.peak_bytes, self.at_peak = total, held
        self.peak_needed = max(self.peak_needed, total - held.get("snapshots", 0) - held.get("working_copies", 0))


async def ask(engine, ids: list[int], new_tokens: int) -> dict:
    """One request: its TTFT (submit to the first token, monotonic clock), tokens and cached tokens."""
    from engine.request import PromptInput
    from engine.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    submitted = time.monotonic()
    first, tokens, usage = None, 0, None
    async for out in engine.submit(PromptInput(token_ids=ids), params):
        first = first or out.first_token_time
        tokens += len(out.token_ids)
        usage = out.usage or usage
    return {"ttft_s": first - submitted, "tokens": tokens, "cached_tokens": usage.cached_tokens}


async def repeated_prompt(engine, system: list[int], questions: list[list[int]]) -> dict:
    """The first question cold (cache cleared), then the others one after another, one token each."""
    engine.clear_cache()
    cold = await ask(engine, system + questions[0], 1)
    warm = [await ask(engine, system + q, 1) for q in questions[1:]]
    return {
        "ttft_cold_s": round(cold["ttft_s"], 4),
        "ttft_warm_p50_s": round(statistics.median(w["ttft_s"] for w in warm), 4),
        "ttft_warm_s": [round(w["ttft_s"], 4) for w in warm],
        "cold_cached_tokens": cold["cached_tokens"],
        "warm_cached_tokens": [w["cached_tokens"] for w in warm],
    }


async def many_clients(engine, probe: Probe, system: list[int], questions: list[list[int]], new_tokens: int) -> dict:
    """Every question at once (cache cleared first): throughput, peak batch and KV bytes at the peak."""
    engine.clear_cache()
    probe.reset()  # the engine is idle: every earlier request has had its last output
    start = time.perf_counter()
    results = await asyncio.gather(*(ask(engine, system + q, new_tokens) for q in questions))
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": len(questions),
        "tok_per_s": round(tokens / wall, 2),
        "wall_s": round(wall, 3),
        "tokens": tokens,
        "ttft_p50_s": round(statistics.median(r["ttft_s"] for r in results), 4),
        "cached_tokens": sum(r["cached_tokens"] for r in results),
        "peak_batch": probe.peak_batch,
        "kv_bytes_peak": probe.peak_bytes,
        "kv_bytes_at_peak": probe.at_peak,
        "kv_bytes_peak_blocks_and_states": probe.peak_needed,
        "sequences_per_gb": per_gb(probe.peak_batch, probe.peak_bytes),
        "sequences_per_gb_blocks_and_states": per_gb(probe.peak_batch, probe.peak_needed),
        "steps": probe.steps,
    }


def per_gb(sequences: int, nbytes: int) -> float | None:
    return round(sequences / (nbytes / 1e9), 2) if nbytes else None


async def one_round(engines: dict, probes: dict, args, seed: int, order: list[str]) -> dict:
    """Both measurements on every engine, in `order`, with prompts drawn from `seed`."""
    out = {}
    for name in order:
        engine = engines[name]
        vocab = _vocab(engine)
        system, questions = prompts(vocab, args.system_tokens, 1 + args.repeats + args.clients, seed)
        repeated = await repeated_prompt(engine, system, questions[: 1 + args.repeats])
        clients = await many_clients(engine, probes[name], system, questions[1 + args.repeats :], args.new_tokens)
        out[name] = {"repeated_prompt": repeated, "clients": clients}
        print(
            f"  {name}: TTFT cold {repeated['ttft_cold_s']} s, warm p50 {repeated['ttft_warm_p50_s']} s "
            f"(cached {repeated['warm_cached_tokens']}); {clients['clients']} clients {clients['tok_per_s']} tok/s, "
            f"peak batch {clients['peak_batch']}, KV at peak {clients['kv_bytes_peak'] / 2**20:.1f} MiB",
            file=sys.stderr,
            flush=True,
        )
    return out


def _vocab(engine) -> int:
    """The model's vocabulary size (a multimodal config keeps it in its text_config)."""
    config = engine.loaded.config
    return config.get("vocab_size") or config["text_config"]["vocab_size"]


def median_of(rounds: list[dict], name: str, part: str, key: str):
    values = [r[name][part][key] for r in rounds if r[name][part][key] is not None]
    return round(statistics.median(values), 4) if values else None


def summarize(rounds: list[dict]) -> dict:
    """Per engine the medians over rounds, and the ratios between the engines."""
    keys = {
        "repeated_prompt": ["ttft_cold_s", "ttft_warm_p50_s"],
        "clients": [
            "tok_per_s",
            "peak_batch",
            "kv_bytes_peak",
            "kv_bytes_peak_blocks_and_states",
            "sequences_per_gb",
            "sequences_per_gb_blocks_and_states",
            "ttft_p50_s",
        ],
    }
    out: dict = {}
    for name in ENGINES:
        out[name] = {k: median_of(rounds, name, part, k) for part, ks in keys.items() for k in ks}
        out[name]["warm_cached_tokens"] = sorted(
            {c for r in rounds for c in r[name]["repeated_prompt"]["warm_cached_tokens"]}
        )
    ours, fallback = out["ours"], out["fallback"]

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    out["ratios"] = {
        "ttft_warm_fallback_over_ours": ratio(fallback["ttft_warm_p50_s"], ours["ttft_warm_p50_s"]),
        "sequences_per_gb_ours_over_fallback": ratio(ours["sequences_per_gb"], fallback["sequences_per_gb"]),
        "sequences_per_gb_blocks_and_states_ours_over_fallback": ratio(
            ours["sequences_per_gb_blocks_and_states"], fallback["sequences_per_gb_blocks_and_states"]
        ),
        "tok_per_s_ours_over_fallback": ratio(ours["tok_per_s"], fallback["tok_per_s"]),
    }
    return out


def table(doc: dict) -> str:
    s, p = doc["summary"], doc["params"]
    header = [
        "cache",
        "TTFT cold s",
        "TTFT warm p50 s",
        "warm cached tokens",
        f"{p['clients']} clients tok/s",
        "peak batch",
        "KV at peak MiB (blocks and states)",
        "sequences per GB of KV (blocks and states)",
    ]
    rows = []
    for name in ENGINES:
        r = s[name]
        mib = [
            fmt(b / 2**20 if b is not None else None)
            for b in (r["kv_bytes_peak"], r["kv_bytes_peak_blocks_and_states"])
        ]
        rows.append(
            [
                name,
                r["ttft_cold_s"],
                r["ttft_warm_p50_s"],
                "/".join(str(c) for c in r["warm_cached_tokens"]),
                r["tok_per_s"],
                r["peak_batch"],
                f"{mib[0]} ({mib[1]})",
                f"{fmt(r['sequences_per_gb'])} ({fmt(r['sequences_per_gb_blocks_and_states'])})",
            ]
        )
    ratios = s["ratios"]
    return "\n".join(
        [
            f"### {doc['model']}: {p['system_tokens']}-token system prompt + {QUESTION_TOKENS}-token questions, "
            f"{p['clients']} clients x {p['new_tokens']} new tokens, {p['rounds']} round(s), medians",
            "",
            md_table(header, rows),
            "",
            f"Warm TTFT fallback / ours: {fmt(ratios['ttft_warm_fallback_over_ours'])}; sequences per GB of KV "
            f"ours / fallback: {fmt(ratios['sequences_per_gb_ours_over_fallback'])} "
            f"({fmt(ratios['sequences_per_gb_blocks_and_states_ours_over_fallback'])} blocks and states only); "
            f"tok/s ours / fallback: {fmt(ratios['tok_per_s_ours_over_fallback'])}. Ours snapshots the recurrent "
            f"state at prompt ends, every {p['state_interval']} prompt tokens and where a prompt's cached K/V "
            "match ends: the first warm request computes from the last snapshot before the prompts part and "
            "leaves one where they part; the later ones resume there (warm cached tokens, in order).",
        ]
    )


def engine_config(paged: bool, args):
    from engine.config import EngineConfig

    update = {"paged_cache": paged, "max_num_seqs": max(args.clients, 1)}
    if args.state_interval is not None:
        update["state_interval"] = args.state_interval
    if args.cache_memory_mb is not None:
        update["cache_memory_mb"] = args.cache_memory_mb
    return EngineConfig(**update)


def engine_info(engine) -> dict:
    """What the engine runs: its cache path and why, whether it batches, its config."""
    stats = engine.stats()
    cache = engine.scheduler.cache.stats()  # read-only; the engine is idle
    keep = ("path", "why", "budget_bytes", "block_size", "block_bytes", "state_bytes_per_sequence")
    return {
        "cache": {k: cache[k] for k in keep if k in cache},
        "cache_counters": {
            k: cache[k]
            for k in ("hits", "prefix_hits", "tokens_reused", "snapshots", "state_resumes", "blocks_used_peak")
            if k in cache
        },
        "batched": stats.get("batched"),
        "batch_check": stats.get("batch_check"),
        "batch_check_detail": stats.get("batch_check_detail"),
        "config": engine.config.model_dump(
            include={
                "paged_cache",
                "max_num_seqs",
                "block_size",
                "state_interval",
                "cache_memory_mb",
                "prefill_step_size",
            }
        ),
    }


async def run(args) -> dict:
    """The whole suite: both engines loaded, warm-up rounds, measured rounds; the JSON document."""
    from engine.engine import AsyncEngine

    engines, probes = {}, {}
    try:
        for name, paged in ENGINES.items():
            print(f"loading {args.model} ({name}: paged_cache={paged})", file=sys.stderr, flush=True)
            engines[name] = AsyncEngine.from_source(args.model, engine_config(paged, args))
            probes[name] = Probe(engines[name])
            if not engines[name].stats().get("batched"):
                print(f"  WARNING: {name} serves one request at a time (batch check)", file=sys.stderr, flush=True)
        for w in range(args.warmup_rounds):
            print(f"warm-up round {w + 1}", file=sys.stderr, flush=True)
            await one_round(engines, probes, args, seed=10_000 + w, order=list(ENGINES))
        rounds = []
        for r in range(args.rounds):
            order = list(ENGINES) if r % 2 == 0 else list(reversed(ENGINES))
            print(f"round {r + 1} ({' then '.join(order)})", file=sys.stderr, flush=True)
            rounds.append(await one_round(engines, probes, args, seed=r, order=order))
        info = {name: engine_info(e) for name, e in engines.items()}
        engines_config = {name: i["config"] for name, i in info.items()}
        model = engines["ours"].info
    finally:
        for e in engines.values():
            e.shutdown()
    doc = {
        "machine": mlx_machine(),
        "model": args.model,
        "model_info": model,
        "params": {
            "system_tokens": args.system_tokens,
            "question_tokens": QUESTION_TOKENS,
            "repeats": args.repeats,
            "clients": args.clients,
            "new_tokens": args.new_tokens,
            "rounds": args.rounds,
            "warmup_rounds": args.warmup_rounds,
            "state_interval": engines_config["ours"]["state_interval"],
            "block_size": engines_config["ours"]["block_size"],
        },
        "engines": info,
        "summary": summarize(rounds),
        "rounds": rounds,
    }
    return doc


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default="synthetic:qwen3_5",
        help="a hybrid model source; on a GPU synthetic:qwen3.5-0.8b-8bit (default: the tiny one, for a CPU)",
    )
    p.add_argument("--system-tokens", type=int, default=2048, help="tokens of the repeated system prompt")
    p.add_argument("--repeats", type=int, default=5, help="warm requests after the cold one")
    p.add_argument("--clients", type=int, default=16, help="concurrent requests in the memory measurement")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens each concurrent request generates")
    p.add_argument("--rounds", type=int, default=2, help="measured rounds (the table gives medians)")
    p.add_argument("--warmup-rounds", type=int, default=1, help="unrecorded rounds first, with other prompts")
    p.add_argument("--state-interval", type=int, help="EngineConfig.state_interval (default: the engine's)")
    p.add_argument("--cache-memory-mb", type=int, help="EngineConfig.cache_memory_mb (default: the engine's)")
    p.add_argument("--out", help="write the JSON document here too")
    return p


def main(argv: list[str] | None = None) -> None:
    from engine.loading.cpu_fast_path import reexec_with_openblas

    reexec_with_openblas()
    p = parser()
    args = p.parse_args(argv)
    if min(args.repeats, args.clients, args.rounds, args.system_tokens) < 1:
        p.error("--repeats, --clients, --rounds and --system-tokens must be at least 1")
    doc = asyncio.run(run(args))
    emit(doc, table(doc), args.out)


if __name__ == "__main__":
    main()
