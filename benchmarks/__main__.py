"""`python -m benchmarks SUITE [OPTIONS]`: every user-facing benchmark behind one command.

Each suite prints a JSON document and a markdown table and can write the JSON to a file;
`python -m benchmarks SUITE --help` shows its options. docs/benchmarks.md has the latest table of
each, with its command, machine, date and JSON. Finished investigations live in benchmarks/lab/.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name: (module with main(argv), what it measures)
SUITES: dict[str, tuple[str, str]] = {
    "load": ("benchmarks.bench_load", "load time, prefill, decode of the bundled models: stock vs fast CPU path"),
    "engine": ("benchmarks.bench_engine", "the engine at 1, 5, 16 concurrent requests, against raw mlx_lm"),
    "paged": ("benchmarks.bench_paged", "KV memory, prefix reuse, paged vs contiguous decode"),
    "hybrid": (
        "benchmarks.bench_hybrid",
        "a hybrid model: repeated system prompt TTFT, sequences per GB of KV, vs fallback",
    ),
    "kvquant": ("benchmarks.bench_kv_quant", "KV blocks at 16/8/4 bits: perplexity, greedy agreement, capacity, tok/s"),
    "vision": ("benchmarks.bench_vision", "a vision model's TTFT: cold image, same image again, seen image, text only"),
    "diskcache": (
        "benchmarks.bench_disk_cache",
        "TTFT of a long system prompt after an eviction: cold, from the disk KV cache, from RAM",
    ),
    "admission": ("benchmarks.bench_admission", "one KV budget: admission by use vs by worst case"),
    "speculative": (
        "benchmarks.bench_speculative",
        "speculative decoding off vs ngram: editing and open-ended prompts at 1 and 5 clients",
    ),
    "lora": (
        "benchmarks.bench_lora",
        "16 requests over 1, 4, 8 LoRA adapters in one batch vs the base alone vs separate fused models",
    ),
    "structured": ("benchmarks.bench_structured", "what a JSON schema costs per step at batch 1 and 16"),
    "http": ("benchmarks.bench_http", "serve run over HTTP beside the engine alone: tok/s, TTFT, memory"),
    "openai": ("benchmarks.openai_bench.__main__", "any OpenAI-compatible endpoint: batching, prefix, sweep, plots"),
    "peers": ("benchmarks.bench_peers", "the headline table against a peer server at a URL"),
    "peers-ab": ("benchmarks.bench_peers_ab", "serve run and mlx_lm.server in turn: ratios per round"),
    "accel": ("benchmarks.bench_accel", "on a GPU: engine, serve run, mlx_lm.server, vllm-mlx at 1-64 clients"),
    "affinity": ("benchmarks.bench_affinity", "prefix-affinity vs power-of-two routing on 2 replicas"),
    "governor": ("benchmarks.bench_governor", "3 models in a 2-model budget vs all resident: loads, TTFT, RSS"),
    "idle": ("benchmarks.bench_idle", "what an idle loaded model costs the busy one (serve run)"),
    "embeddings": (
        "benchmarks.bench_embeddings",
        "embeddings/s at 1-64 clients: serve run with and without @serve.batch, the engine, sentence-transformers",
    ),
    "parsing": ("benchmarks.bench_parsing", "what reasoning and tool-call parsing cost per token in the router"),
    "soak": ("benchmarks.soak", "steady load with disconnects: is the process tree's RSS flat?"),
    "shutdown": ("benchmarks.bench_shutdown", "Ctrl-C to serve run's process group: exit code, seconds"),
}


def parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<11} {about}" for name, (_, about) in SUITES.items())
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        epilog=f"suites:\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("suite", choices=SUITES, metavar="SUITE", help="one of the suites below")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the suite's own options (SUITE --help lists them)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    module = importlib.import_module(SUITES[args.suite][0])
    # the suite's argparse names itself after argv[0] in its usage line
    sys.argv = [f"python -m benchmarks {args.suite}", *args.args]
    return module.main(args.args) or 0


if __name__ == "__main__":
    raise SystemExit(main())
