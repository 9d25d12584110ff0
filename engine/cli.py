"""Command line: `python -m engine.cli smoke | export | generate`.

On CPU-only Linux it re-executes itself with OpenBLAS preloaded (the fast path).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from .loading.cpu_fast_path import reexec_with_openblas

SMOKE = [
    ("smollm2-135m-instruct", {"messages": [{"role": "user", "content": "What is the capital of France?"}]}),
    ("gemma-3-270m", {"text": "The capital of France is"}),
]


def smoke(max_tokens: int) -> int:
    """Load each bundled model and answer one question greedily."""
    import mlx_lm

    from .loading.loader import load_model
    from .prompts import encode_prompt
    from .request import PromptInput

    results = []
    for source, prompt in SMOKE:
        loaded = load_model(source)
        ids = encode_prompt(loaded.tokenizer, PromptInput(**prompt))
        start = time.perf_counter()
        text = mlx_lm.generate(loaded.model, loaded.tokenizer, ids, max_tokens=max_tokens)
        elapsed = time.perf_counter() - start
        results.append({**loaded.summary(), "prompt": prompt, "completion": text, "generate_s": round(elapsed, 2)})
        print(f"{source}: {text!r}", flush=True)
    print(json.dumps(results, indent=2))
    return 0


def export(source: str, out_dir: str, dequantize: bool) -> int:
    from .loading import gguf
    from .loading.sources import resolve_source

    resolved = resolve_source(source)
    if resolved.kind != "gguf":
        print(f"{source} is not a GGUF file (it is {resolved.kind})", file=sys.stderr)
        return 2
    print(gguf.export_mlx(resolved.location, out_dir, dequantize=dequantize))
    return 0


def generate(source: str, prompt: str, max_tokens: int, chat: bool) -> int:
    import mlx_lm

    from .loading.loader import load_model
    from .prompts import encode_prompt
    from .request import PromptInput

    loaded = load_model(source)
    given = PromptInput(messages=[{"role": "user", "content": prompt}]) if chat else PromptInput(text=prompt)
    ids = encode_prompt(loaded.tokenizer, given)
    for response in mlx_lm.stream_generate(loaded.model, loaded.tokenizer, ids, max_tokens=max_tokens):
        print(response.text, end="", flush=True)
    print()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.cli", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("smoke", help="load the bundled models and answer one question each")
    p.add_argument("--max-tokens", type=int, default=16)
    p = sub.add_parser("export", help="export a GGUF file to an MLX directory that mlx_lm.load opens")
    p.add_argument("source")
    p.add_argument("out_dir")
    p.add_argument("--dequantize", action="store_true", help="write float32 weights (fast on Linux CPU + OpenBLAS)")
    p = sub.add_parser("generate", help="stream a completion from any model source")
    p.add_argument("source")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    args = parser.parse_args(argv)
    reexec_with_openblas()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from .errors import OrchardError

    try:
        if args.command == "smoke":
            return smoke(args.max_tokens)
        if args.command == "export":
            return export(args.source, args.out_dir, args.dequantize)
        return generate(args.source, args.prompt, args.max_tokens, args.chat)
    except OrchardError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
