"""sentence-transformers' side of `python -m benchmarks embeddings`, run by path in the venv that has
sentence-transformers and torch (never imported by the project: it imports nothing of it).

    PYTHON st_embeddings_worker.py --model DIR --texts TEXTS.json --batches 1 16 64 --seconds 10 --threads 2

TEXTS.json maps each input size to its texts. For each size and batch size, `model.encode` runs on
batches of that many texts in a loop for --seconds (after one warm-up batch); one JSON document
on stdout: {"sentence_transformers": version, "torch": version, "cells": [{size, batch,
embeddings_per_s, calls, p50_call_ms}]}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def cell(model, texts: list[str], batch: int, seconds: float) -> dict:
    def call(i: int) -> None:
        chunk = [texts[(i + k) % len(texts)] for k in range(batch)]
        model.encode(chunk, batch_size=batch, convert_to_numpy=True, normalize_embeddings=False)

    call(0)  # warm-up
    times, start, i = [], time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - t)
        i += batch
    wall = time.perf_counter() - start
    return {
        "batch": batch,
        "embeddings_per_s": len(times) * batch / wall,
        "calls": len(times),
        "p50_call_ms": statistics.median(times) * 1000,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="the sentence-transformers model directory")
    ap.add_argument("--texts", required=True, help="JSON: {size: [texts]}")
    ap.add_argument("--batches", nargs="+", type=int, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--threads", type=int, required=True)
    args = ap.parse_args()

    import sentence_transformers
    import torch

    torch.set_num_threads(args.threads)
    model = sentence_transformers.SentenceTransformer(args.model, device="cpu")
    with open(args.texts) as f:
        sizes = json.load(f)
    cells = []
    with torch.inference_mode():
        for size, texts in sizes.items():
            for batch in args.batches:
                cells.append({"size": size, **cell(model, texts, batch, args.seconds)})
    doc = {"sentence_transformers": sentence_transformers.__version__, "torch": torch.__version__, "cells": cells}
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
